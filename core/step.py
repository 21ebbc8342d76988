"""The shared first-order step: how parameters move, for every gradient recipe.

A recipe supplies its *objective* (`Objective`: which examples a micro-batch holds and their per-sample losses)
and its evaluation; `FirstOrderStep` decides how parameters move: the LR schedule, loss reduction, backward,
gradient accumulation, the ``grad_transform:`` chain (DP, SAM, …), global-norm clipping and the optimizer. Every
first-order recipe therefore accepts the same transforms, and they act the same way everywhere.

One step, in order:

1. the LR of the step (`lr_factor`, one schedule for every recipe) is set on every parameter group;
2. each transform's optional ``before_forward(model, step)`` (DP-SAT: move to w + e);
3. the micro-batches: the chain's ``batch_indices(step)`` (Poisson sampling) or the objective's own order, then
   per micro-batch the objective's loss — ``mean_loss(indices)`` when the chain wants a mean, the sum of
   ``sample_losses(indices)`` when it wants per-sample sums (DP) — and backward; an empty batch is skipped;
4. the chain ``transform(model, step)`` in config order (clip + noise, SAM's ascent, …), then
   ``after_transforms(model, step)`` (DP-SAT: back to w);
5. global-norm clipping unless a transform replaces it, the optimizer step, ``zero_grad``.

The SAM transform recomputes the step's loss through `loss_closure`, which re-runs the step's micro-batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine", "step")
OPTIMIZERS = ("adamw", "adam", "sgd")


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, min_ratio: float = 0.0,
              decay_every: int = 0, gamma: float = 0.1) -> float:
    """Multiplier of the base LR at ``step`` (1-based; ``total`` = the run's steps).

    Linear warm-up over the first ``warmup`` steps, then constant, a linear / cosine decay that reaches
    ``min_ratio`` at ``total``, or ``step``: × ``gamma`` after every ``decay_every`` steps (torch's StepLR
    stepped once per step: steps 1…N at the base LR). A recipe that counts steps from 0 and decays to its last
    step passes ``(step - 1, steps - 1)``.
    """
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "constant" or (schedule == "step" and decay_every <= 0):
        return 1.0
    if schedule == "step":
        return gamma ** ((step - 1) // decay_every)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        f = 1.0 - progress
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return f if min_ratio == 0.0 else min_ratio + (1.0 - min_ratio) * f


def check_schedule(key: str, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"{key}: {schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")


def check_update_options(key: str, *, optimizer: str, schedule: str, lr: float) -> None:
    """What `FirstOrderStep` refuses, for a recipe to check before it builds anything."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"{key}.optimizer: {optimizer!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    check_schedule(f"{key}.schedule", schedule)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{key}.lr: must be positive, got {lr}")


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


@runtime_checkable
class Objective(Protocol):
    """What a gradient recipe supplies to `FirstOrderStep`.

    ``batch_indices(step, micro)`` — the examples of micro-batch ``micro`` (0-based) of ``step`` when no
    transform samples the batch; ``sample_losses(indices)`` — each example's loss, shape [B], differentiable
    (a private step sums them). Optional: ``mean_loss(indices)`` — the recipe's own batch loss for a mean
    reduction (e.g. a token mean over the batch or a class-weighted mean; default: the mean of sample_losses),
    or a `Backwarded` value when it ran its own backward(s).
    """

    def batch_indices(self, step: int, micro: int) -> Sequence[int]: ...

    def sample_losses(self, indices: Sequence[int]) -> torch.Tensor: ...


class TransformChain:
    """``grad_transform:`` as a list: each member's optional hooks run in config order.

    Rules (checked at validate from the entries' declarations, see `plait.config.check_chain`): at most one private
    transform; nothing after it reads the data again; a data-reading transform before it runs in its
    private-compatible mode (``compose_before_private()``; e.g. SAM becomes DP-SAT).
    """

    def __init__(self, members: Sequence[Any], names: Sequence[str] | None = None):
        self.members = list(members)
        self.names = list(names or [type(m).__name__ for m in members])
        reductions = {getattr(m, "loss_reduction", "mean") for m in self.members}
        self.loss_reduction = "sum" if "sum" in reductions else "mean"
        self.replaces_clipping = any(getattr(m, "replaces_clipping", False) for m in self.members)

    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def prepare(self, model: torch.nn.Module, **kw: Any) -> torch.nn.Module:
        for m in self.members:
            if hasattr(m, "prepare"):
                model = m.prepare(model, **kw)
        return model

    def batch_indices(self, step: int) -> list[int] | None:
        for m in self.members:
            if hasattr(m, "batch_indices"):
                idx = m.batch_indices(step)
                if idx is not None:
                    return idx
        return None

    def _each(self, hook: str, *args: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for m in self.members:
            fn = getattr(m, hook, None)
            if fn is not None:
                metrics.update(fn(*args) or {})
        return metrics

    def before_forward(self, model: torch.nn.Module, step: int) -> None:
        self._each("before_forward", model, step)

    def before_backward(self, step: int) -> None:
        self._each("before_backward", step)

    def set_loss_closure(self, fn: Callable[[], torch.Tensor] | None) -> None:
        for m in self.members:
            if hasattr(m, "set_loss_closure"):
                m.set_loss_closure(fn)

    def before_reduce(self, model: torch.nn.Module, step: int) -> None:
        self._each("before_reduce", model, step)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return self._each("__call__", model, step)

    def after_transforms(self, model: torch.nn.Module, step: int) -> None:
        self._each("after_transforms", model, step)

    def log_metrics(self, step: int) -> dict[str, float]:
        return self._each("log_metrics", step)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.members:
            if hasattr(m, "summary"):
                out.update(m.summary())
        return out

    def _collect(self, method: str) -> dict[str, Any]:
        """Each member's ``method()`` keyed by place (``0``, ``1``, …); a single member's own dict as it is."""
        if len(self.members) == 1:
            m = self.members[0]
            return getattr(m, method)() if hasattr(m, method) else {}
        return {str(i): getattr(m, method)() for i, m in enumerate(self.members) if hasattr(m, method)}

    def _hand_out(self, method: str, state: dict[str, Any]) -> None:
        """The inverse of `_collect`: each member's part to its ``method(part)``."""
        if len(self.members) == 1:
            if hasattr(self.members[0], method):
                getattr(self.members[0], method)(state)
            return
        for i, m in enumerate(self.members):
            if hasattr(m, method) and str(i) in state:
                getattr(m, method)(state[str(i)])

    def state_dict(self) -> dict[str, Any]:
        """One entry per member, keyed by place (``0``, ``1``, …); a single transform keeps its own state."""
        return self._collect("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._hand_out("load_state_dict", state)

    def progress_state(self) -> dict[str, Any]:
        """What a skipped step keeps (``run.on_nonfinite=skip``): each member's optional ``progress_state()``,
        e.g. a DP accountant's count of the releases made (the step ran its mechanism even if its update is
        undone); keyed as `state_dict`."""
        return self._collect("progress_state")

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self._hand_out("load_progress_state", state)


def _private_ddp_allowed(run: Any) -> str:
    """What a data-parallel placement runs privately, read from the ``grad_transform`` registry: the entries that
    declare ``defers_noise`` (their objects have ``set_parallel``), alone or after one that declares
    ``composes_before_private`` (DP-SAT)."""
    host = getattr(run, "host", None)
    if host is None:
        from .manager import get_host

        host = get_host()
    entries = host.registries.for_section("grad_transform").entries()
    defer = [e.name for e in entries if e.extra.get("defers_noise")]
    before = [e.name for e in entries if e.extra.get("composes_before_private")]
    if not defer:
        return "no registered grad_transform defers its noise to after the all-reduce (plait ls grad_transform)"
    tail = f", alone or after {' / '.join(before)} (DP-SAT)" if before else ", alone"
    return (f"private ddp takes one DP transform that defers its noise to after the all-reduce "
            f"({', '.join(defer)}){tail}")


class FirstOrderStep:
    """One optimizer step of a first-order recipe (see the module docstring).

    ``transform`` is what ``run.build("grad_transform")`` returned (one transform or a `TransformChain`), or
    None. ``param_groups`` defaults to one group of the trainable parameters (after the transforms' prepare).
    """

    def __init__(self, run: Any, model: torch.nn.Module, objective: Objective, *, optimizer: str = "adamw",
                 lr: float, weight_decay: float = 0.0, momentum: float = 0.0, betas: tuple[float, float] = (0.9,
                 0.999), schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 decay_every: int = 0, gamma: float = 0.1, max_grad_norm: float = 0.0, grad_accum: int = 1, batch_size: int, dataset_size: int,
                 transform: Any = None, param_groups: Callable[[torch.nn.Module], Iterable] | None = None,
                 key: str = "recipe"):
        check_update_options(key, optimizer=optimizer, schedule=schedule, lr=lr)
        self.run, self.objective = run, objective
        self.lr, self.schedule, self.warmup, self.min_lr_ratio = float(lr), schedule, int(warmup_steps), min_lr_ratio
        self.decay_every, self.gamma = int(decay_every), float(gamma)
        self.max_grad_norm, self.grad_accum = float(max_grad_norm), int(grad_accum)
        self.total = int(run.cfg.run.steps)
        self.dataset_size = int(dataset_size)  # the examples per-sample attribution scores (plait attribute)
        if transform is not None and not isinstance(transform, TransformChain):
            transform = TransformChain([transform])
        self.transform: TransformChain | None = transform
        if transform is not None:
            try:
                model = transform.prepare(model, dataset_size=dataset_size, batch_size=batch_size,
                                          steps=self.total, seed=int(run.cfg.run.seed), grad_accum=self.grad_accum)
            except ValueError as exc:
                raise ConfigError(f"grad_transform: {exc}") from exc
        self.model = model
        # a data-parallel placement (``parallel:`` with ``split_batch`` / ``reduce_gradients``): each rank its
        # slice of every micro-batch, the gradients summed over ranks once per step (see `_parallel_micro`)
        par = getattr(run, "parallel", None)
        self.dist = par if hasattr(par, "reduce_gradients") and hasattr(par, "split_batch") else None
        if self.dist is not None:
            self_sampled = [] if transform is None else [m for m in transform
                                                         if getattr(m, "loss_reduction", "mean") == "sum"
                                                         or hasattr(m, "batch_indices")]
            # private DDP: one DP transform that defers its noise to after the all-reduce (``set_parallel``),
            # alone or after members that read no batch of their own (DP-SAT's ascent: the previous step's
            # noisy global gradient, the same on every rank once the noise is added after the all-reduce)
            private = len(self_sampled) == 1 and hasattr(self_sampled[0], "set_parallel")
            if self_sampled and not private:
                raise ConfigError(f"grad_transform: {', '.join(map(repr, transform.names))} under parallel "
                                  f"{getattr(par, 'name', '?')!r} is not supported yet; {_private_ddp_allowed(run)}")
            if hasattr(par, "broadcast_parameters"):
                par.broadcast_parameters(model)
            if hasattr(par, "place_model"):  # a sharding placement (fsdp) wraps the model before the optimizer
                model = self.model = par.place_model(model, run)
            if private:
                self_sampled[0].set_parallel(par)
        self.sum_loss = transform is not None and transform.loss_reduction == "sum"
        self.clip = self.max_grad_norm > 0 and not (transform is not None and transform.replaces_clipping)
        groups = list(param_groups(model)) if param_groups else [p for p in model.parameters() if p.requires_grad]
        if not groups:
            raise ConfigError("model: nothing left to train (every parameter is frozen)")
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=weight_decay, betas=betas)
        elif optimizer == "adam":  # L2 penalty in the gradient (torch.optim.Adam's weight_decay), not decoupled
            self.optimizer = torch.optim.Adam(groups, lr=self.lr, weight_decay=weight_decay, betas=betas)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=momentum, weight_decay=weight_decay)
        self._micro: list[Sequence[int]] = []

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, self.total, self.schedule, self.warmup, self.min_lr_ratio,
                                   self.decay_every, self.gamma)

    def _loss(self, idx: Sequence[int]) -> tuple[torch.Tensor, float]:
        """(the loss to backward, its value for logging: the batch mean)."""
        obj = self.objective
        if self.sum_loss:
            per_sample = obj.sample_losses(idx)
            return per_sample.sum(), float(per_sample.detach().mean())
        loss = obj.mean_loss(idx) if hasattr(obj, "mean_loss") else obj.sample_losses(idx).mean()
        if isinstance(loss, Backwarded):  # the objective ran its own backward(s), e.g. to free activations early
            if self.grad_accum != 1:
                raise RuntimeError("an objective that backwards its own loss needs grad_accum 1")
            return loss, float(loss)
        return loss / self.grad_accum, float(loss.detach()) / self.grad_accum

    def loss_closure(self) -> torch.Tensor:
        """The step's loss at the current weights, recomputed over the step's micro-batches (each backwarded
        as it is computed; returns the detached total): what SAM's ascent needs."""
        total = 0.0
        for idx in self._micro:
            loss, value = self._loss(idx)
            loss.backward()
            total += value
        return Backwarded(total)

    def __call__(self, step: int) -> dict[str, float]:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model, chain = self.model, self.transform
        model.train()
        chosen = chain.batch_indices(step) if chain is not None else None
        if chain is not None:
            chain.before_forward(model, step)
            chain.before_backward(step)
        self._micro = []
        total = 0.0
        if self.dist is not None:
            return self._private_parallel_step(step, lr, chosen) if self.sum_loss else self._parallel_step(step, lr)
        for j in range(1 if chosen is not None else self.grad_accum):  # a sampled batch is the step's whole batch
            idx = chosen if chosen is not None else self.objective.batch_indices(step, j)
            if len(idx) == 0:
                continue  # an empty (Poisson-sampled) batch: the transform supplies the update
            self._micro.append(idx)
            loss, value = self._loss(idx)
            loss.backward()
            total += value
        metrics: dict[str, float] = {"train/lr": lr}
        if self._micro:  # an empty batch has no loss: a 0.0 would pull the window's mean down
            metrics["train/loss"] = total if not self.sum_loss else total / len(self._micro)
        if chain is not None:
            chain.set_loss_closure(self.loss_closure)
            metrics.update(chain(model, step) or {})
            chain.after_transforms(model, step)
        if self.clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
            metrics["train/grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = []
        return metrics

    def _parallel_pass(self) -> float:
        """Backward this rank's share of the step's micro-batches (``self._local``), then sum the gradients and
        the loss over ranks; returns the global loss."""
        obj, mine = self.objective, 0.0
        for idx, w, total_w in self._local:
            if len(idx) == 0 or total_w == 0:
                continue
            loss = obj.mean_loss(idx) if hasattr(obj, "mean_loss") else obj.sample_losses(idx).mean()
            if isinstance(loss, Backwarded):
                raise ConfigError(f"parallel {getattr(self.dist, 'name', '?')!r}: this recipe backwards its own "
                                  f"loss (micro_batch_size > 0); set it to 0 under a data-parallel strategy")
            loss = loss * (w / total_w / self.grad_accum)
            loss.backward()
            mine += float(loss.detach())
        (total,) = self.dist.reduce_gradients(self.model.parameters(), [mine])
        return total

    def _parallel_step(self, step: int, lr: float) -> dict[str, float]:
        """The step on a data-parallel placement: rank r backwards mean_loss(its slice) × w_r / Σ w (w: the
        objective's ``loss_weight(indices)``, e.g. labelled tokens, default the example count), so the sum over
        ranks of the gradients is the single-process gradient of the global micro-batch's mean loss; one
        all-reduce of the weights before, one of the gradients (and the loss) after the last micro-batch. A
        transform that recomputes the loss (SAM) gets a closure that does the same at its weights."""
        obj, dist, chain = self.objective, self.dist, self.transform
        local = [dist.split_batch(obj.batch_indices(step, j)) for j in range(self.grad_accum)]
        weigh = getattr(obj, "loss_weight", None)
        weights = [float(weigh(idx)) if weigh is not None and len(idx) else float(len(idx)) for idx in local]
        self._local = list(zip(local, weights, dist.all_reduce_sum(weights)))
        metrics: dict[str, float] = {"train/lr": lr, "train/loss": self._parallel_pass()}
        if chain is not None:
            chain.set_loss_closure(lambda: Backwarded(self._parallel_pass()))
            metrics.update(chain(self.model, step) or {})
            chain.after_transforms(self.model, step)
        metrics.update(dist.metrics() if hasattr(dist, "metrics") else {})
        if self.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            metrics["train/grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._local = []
        return metrics

    def _private_parallel_step(self, step: int, lr: float, chosen: Sequence[int] | None) -> dict[str, float]:
        """Private DDP (Opacus' DistributedDPOptimizer): the step's Poisson draw is over the whole dataset at the
        global rate (every rank draws the same batch from the shared secret seed) and each rank keeps the drawn
        examples of its slice of the dataset (possibly none); each rank backwards the SUM of its samples' losses,
        so its DP layers leave the clipped sum (the transform defers the noise); one all-reduce sums the clipped
        sums and the loss; the transform then adds the noise once and divides by the expected batch, identically
        on every rank."""
        obj, dist, chain = self.objective, self.dist, self.transform
        if chosen is not None:
            idx = dist.share_sampled(chosen, self.dataset_size)
        else:  # poisson false (allow_no_privacy): the fixed-size batch, sliced as without DP
            idx = dist.split_batch(obj.batch_indices(step, 0))
        loss_sum, count = 0.0, 0
        if len(idx):
            per_sample = obj.sample_losses(idx)
            per_sample.sum().backward()
            loss_sum, count = float(per_sample.detach().sum()), len(idx)
        chain.before_reduce(self.model, step)
        loss_sum, count = dist.reduce_gradients(self.model.parameters(), [loss_sum, count])
        metrics: dict[str, float] = {"train/lr": lr}
        if count:  # an empty global batch has no loss (as in one process)
            metrics["train/loss"] = loss_sum / count
        metrics.update(chain(self.model, step) or {})
        chain.after_transforms(self.model, step)
        metrics.update(dist.metrics() if hasattr(dist, "metrics") else {})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    # --- what the recipe forwards from its Task methods -----------------------------------------------------
    def log_metrics(self, step: int) -> dict[str, float]:
        return self.transform.log_metrics(step) if self.transform is not None else {}

    def summary(self) -> dict[str, Any]:
        return self.transform.summary() if self.transform is not None else {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.dist is not None:
            state["world_size"] = int(getattr(self.dist, "world_size", 1))
        if self.transform is not None:
            state["grad_transform"] = self.transform.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = int(state.get("world_size", 1)), int(getattr(self.dist, "world_size", 1))
        if saved != now:  # the batch split, the loss weights and the data order belong to the world size
            raise ConfigError(f"run.resume: the checkpoint was written by {saved} rank(s), this run has {now}; "
                              f"resume with --nproc {saved} (the same world size)")
        self.optimizer.load_state_dict(state["optimizer"])
        if "grad_transform" in state and self.transform is not None:
            self.transform.load_state_dict(state["grad_transform"])

    def progress_state(self) -> dict[str, Any]:
        """The part of the state that a skipped step keeps: the transforms' (privacy accounting); the recipe
        adds its own (e.g. its batch generator), see `plait.run.Task`."""
        return {"grad_transform": self.transform.progress_state()} if self.transform is not None else {}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        if "grad_transform" in state and self.transform is not None:
            self.transform.load_progress_state(state["grad_transform"])


class StepProgress:
    """For a recipe built on `FirstOrderStep` (``self.step``), optionally drawing its batches from its own
    ``torch.Generator`` (``self.gen``): the `plait.run.Task` progress a skipped step keeps — the transforms'
    privacy accounting and the generator (so that the next step draws another batch)."""

    def progress_state(self) -> dict[str, Any]:
        state = self.step.progress_state()
        gen = getattr(self, "gen", None)
        return state if gen is None else {**state, "generator": gen.get_state()}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.step.load_progress_state(state)
        if "generator" in state:
            self.gen.set_state(state["generator"])


class Backwarded(float):
    """A loss whose gradient is already in ``.grad``: what `FirstOrderStep.loss_closure` returns, and what an
    objective's ``mean_loss`` may return after running its own backward(s) (``.backward()`` and ``.detach()``
    are no-ops, so code written for a tensor loss works unchanged)."""

    def backward(self) -> None:
        pass

    def detach(self) -> float:
        return float(self)
