"""Recipe ``sft``: first-order fine-tuning of a causal LM on prompt/completion pairs.

AdamW or SGD, constant / linear / cosine LR schedule with warm-up, global grad-norm clipping, gradient
accumulation, optional ``grad_transform:`` applied after backward, and evaluation (completion loss, and
label-word accuracy for classification datasets). The loop itself is ``plait.run.train_loop``.

    plait run configs/basics/sft_quickstart.yaml
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from plait.errors import ConfigError
from plait.run import Run, train_loop

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


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base LR at ``step`` (1-based)."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


class BatchOrder:
    """Example indices for micro-batch ``k`` (0-based): a seeded permutation per epoch, a function of
    (seed, k) alone so that a resumed run draws exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ConfigError("data: the train split is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # only the current epoch is kept
        return self._perms[epoch]

    def __call__(self, k: int) -> list[int]:
        start = k * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]


class SFTRecipe:
    """Builds model, data and optimizer from the run, then drives `train_loop`."""

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = SFTConfig(**options)
        c = self.cfg
        if c.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"recipe.optimizer: {c.optimizer!r} is not supported; allowed: adamw, sgd")
        if c.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"recipe.schedule: {c.schedule!r} is not supported; allowed: constant, linear, "
                              f"cosine")
        check_positive(c, ("batch_size", "grad_accum", "max_length", "eval_batch_size"))
        # 0 turns these off; eval_examples (0: all) is checked by load_text_splits, shared with the zo recipe
        check_non_negative(c, ("warmup_steps", "max_grad_norm", "weight_decay", "momentum"))
        if c.lr <= 0:
            raise ConfigError(f"recipe.lr: must be positive, got {c.lr}")
        self.device = run.device
        model, self.tokenizer = build_lm(run)
        self.model = model.to(self.device)
        splits = load_text_splits(run, self.tokenizer, c.max_length, c.eval_examples)
        self.data, self.train_items = splits.data, splits.train_items
        self.eval_examples, self.eval_items = splits.eval_examples, splits.eval_items
        self.grad_transform = gt = run.build("grad_transform") if run.has("grad_transform") else None
        if gt is not None and hasattr(gt, "prepare"):  # e.g. DP: swap layers, size the noise
            try:
                self.model = gt.prepare(self.model, dataset_size=len(self.train_items), batch_size=c.batch_size,
                                        steps=run.cfg.run.steps, seed=run.cfg.run.seed, grad_accum=c.grad_accum)
            except ValueError as exc:
                raise ConfigError(f"grad_transform: {exc}") from exc
        self.sum_loss = getattr(gt, "loss_reduction", "mean") == "sum"
        self.clip = c.max_grad_norm > 0 and not getattr(gt, "replaces_clipping", False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        self.order = BatchOrder(len(self.train_items), c.batch_size, run.cfg.run.seed)

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        if hasattr(self.grad_transform, "summary"):
            result.update(self.grad_transform.summary())
        return result

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        lr = c.lr * lr_factor(step, self.run.cfg.run.steps, c.schedule, c.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        gt, total, trained = self.grad_transform, 0.0, False
        chosen = gt.batch_indices(step) if hasattr(gt, "batch_indices") else None
        if hasattr(gt, "before_backward"):
            gt.before_backward(step)
        for j in range(c.grad_accum):
            idx = chosen if chosen is not None else self.order((step - 1) * c.grad_accum + j)
            if not idx:
                continue  # an empty (Poisson-sampled) batch: the transform supplies the update
            trained = True
            items = [self.train_items[i] for i in idx]
            batch = {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}
            if self.sum_loss:  # Σ over samples of each sample's mean token loss
                per_sample = sample_losses(self.model, batch)
                per_sample.sum().backward()
                total += float(per_sample.detach().mean())
            else:
                loss = self.model(**batch).loss
                (loss / c.grad_accum).backward()
                total += loss.item() / c.grad_accum
        metrics = {"train/lr": lr}
        if trained:  # an empty batch has no loss: a 0.0 would pull the window's mean down
            metrics["train/loss"] = total
        if gt is not None:
            metrics.update(gt(self.model, step) or {})
        if self.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            metrics["train/grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        return evaluate_lm(lambda ids, mask: self.model(input_ids=ids, attention_mask=mask).logits,
                           self.tokenizer, self.eval_items, self.eval_examples,
                           getattr(self.data, "label_words", None), self.cfg.max_length,
                           self.cfg.eval_batch_size, self.device)

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transform's values at a logged step (e.g. DP's ε so far), not window-averaged."""
        if hasattr(self.grad_transform, "log_metrics"):
            return self.grad_transform.log_metrics(step)
        return {}

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if hasattr(self.grad_transform, "state_dict"):
            state["grad_transform"] = self.grad_transform.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "grad_transform" in state:
            self.grad_transform.load_state_dict(state["grad_transform"])


def sample_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's mean next-token loss over its labelled positions, shape [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
                                            reduction="none")
    mask = (labels != -100).float()
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)
