"""Recipe ``sft``: first-order fine-tuning of a causal LM on prompt/completion pairs.

AdamW or SGD, constant / linear / cosine LR schedule with warm-up, global grad-norm clipping, gradient
accumulation, optional ``grad_transform:`` applied after backward, and evaluation (completion loss, and
label-word accuracy for classification datasets). The loop itself is ``plait.run.train_loop``.

    plait run configs/quickstart.yaml
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from plait.errors import ConfigError
from plait.run import Run, train_loop

from .data import collate, tokenize_example
from .evaluation import evaluate_lm


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


def tokenize_split(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    return [tokenize_example(tokenizer, e["prompt"], e["completion"], max_length) for e in examples]


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
        for key in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
            if getattr(c, key) < 1:
                raise ConfigError(f"recipe.{key}: must be at least 1, got {getattr(c, key)}")
        if c.lr <= 0:
            raise ConfigError(f"recipe.lr: must be positive, got {c.lr}")
        self.device = run.device
        bundle = run.build("model")
        model = bundle.model
        for transform in run.build_transforms():
            model = transform(model)
        self.model = model.to(self.device)
        self.tokenizer = bundle.tokenizer
        self.data = run.build("data")
        self.train_items = tokenize_split(self.tokenizer, self.data.examples("train"), c.max_length)
        eval_examples = self.data.examples("eval")
        if c.eval_examples:
            eval_examples = eval_examples[:c.eval_examples]
        self.eval_examples = eval_examples
        self.eval_items = tokenize_split(self.tokenizer, eval_examples, c.max_length)
        self.grad_transform = run.build("grad_transform") if run.has("grad_transform") else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        self.order = BatchOrder(len(self.train_items), c.batch_size, run.cfg.run.seed)

    def __call__(self) -> dict[str, Any]:
        return train_loop(self.run, self)

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        lr = c.lr * lr_factor(step, self.run.cfg.run.steps, c.schedule, c.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for j in range(c.grad_accum):
            items = [self.train_items[i] for i in self.order((step - 1) * c.grad_accum + j)]
            batch = {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}
            loss = self.model(**batch).loss
            (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        metrics = {"train/loss": total, "train/lr": lr}
        if self.grad_transform is not None:
            metrics.update(self.grad_transform(self.model, step) or {})
        if c.max_grad_norm > 0:
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

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
