"""Recipe ``sft``: first-order fine-tuning of a causal LM on prompt/completion pairs.

The recipe is the objective (per-sample completion losses), the data and the evaluation (completion loss, and
label-word accuracy for classification datasets). How parameters move — AdamW or SGD, the LR schedule, clipping,
accumulation, the ``grad_transform:`` chain — is the shared ``plait.step.FirstOrderStep``; the loop is
``plait.run.train_loop``.

    plait run configs/basics/sft_quickstart.yaml
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from plait.run import Run, train_loop
from plait.step import BatchOrder, FirstOrderStep, StepProgress, check_update_options

from .data import collate
from .evaluation import evaluate_lm
from .parts import build_lm, check_non_negative, check_positive, load_text_splits


@dataclass
class SFTConfig:
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: str = "constant"  # constant | linear | cosine (decay to 0 at run.steps)
    warmup_steps: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 128
    eval_batch_size: int = 64
    eval_examples: int = 0  # 0: the whole eval split


class SFTRecipe(StepProgress):
    """Builds model and data from the run; the shared `FirstOrderStep` moves the parameters; `train_loop` drives."""

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = SFTConfig(**options)
        c = self.cfg
        check_update_options("recipe", optimizer=c.optimizer, schedule=c.schedule, lr=c.lr)
        check_positive(c, ("batch_size", "grad_accum", "max_length", "eval_batch_size"))
        # 0 turns these off; eval_examples (0: all) is checked by load_text_splits, shared with the zo recipe
        check_non_negative(c, ("warmup_steps", "max_grad_norm", "weight_decay", "momentum"))
        self.device = run.device
        model, self.tokenizer = build_lm(run)
        splits = load_text_splits(run, self.tokenizer, c.max_length, c.eval_examples)
        self.data, self.train_items = splits.data, splits.train_items
        self.eval_examples, self.eval_items = splits.eval_examples, splits.eval_items
        self.order = BatchOrder(len(self.train_items), c.batch_size, run.cfg.run.seed)
        transform = run.build("grad_transform") if run.has("grad_transform") else None
        self.step = FirstOrderStep(run, model.to(self.device), self, optimizer=c.optimizer, lr=c.lr,
                                   weight_decay=c.weight_decay, momentum=c.momentum, schedule=c.schedule,
                                   warmup_steps=c.warmup_steps, max_grad_norm=c.max_grad_norm,
                                   grad_accum=c.grad_accum, batch_size=c.batch_size,
                                   dataset_size=len(self.train_items), transform=transform)
        self.model, self.optimizer, self.grad_transform = self.step.model, self.step.optimizer, transform

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        result.update(self.step.summary())
        return result

    # --- Objective (plait.step) ----------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> list[int]:
        return self.order((step - 1) * self.cfg.grad_accum + micro)

    def _batch(self, idx) -> dict[str, torch.Tensor]:
        items = [self.train_items[i] for i in idx]
        return {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}

    def sample_losses(self, idx) -> torch.Tensor:
        """Each sample's mean token loss (a private step sums them)."""
        return sample_losses(self.model, self._batch(idx))

    def mean_loss(self, idx) -> torch.Tensor:
        """The model's own loss: the token mean over the batch."""
        return self.model(**self._batch(idx)).loss

    def loss_weight(self, idx) -> int:
        """What `mean_loss` averages over: the batch's labelled (next-token) positions."""
        items = [self.train_items[i] for i in idx]
        return int((collate(items, self.tokenizer.pad_token_id)["labels"][:, 1:] != -100).sum())

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        return self.step(step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        return evaluate_lm(lambda ids, mask: self.model(input_ids=ids, attention_mask=mask).logits,
                           self.tokenizer, self.eval_items, self.eval_examples,
                           getattr(self.data, "label_words", None), self.cfg.max_length,
                           self.cfg.eval_batch_size, self.device, run=self.run)

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transforms' values at a logged step (e.g. DP's ε so far), not window-averaged."""
        return self.step.log_metrics(step)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), **self.step.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state)


def sample_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's mean next-token loss over its labelled positions, shape [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
                                            reduction="none")
    mask = (labels != -100).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
