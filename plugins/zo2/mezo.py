"""MeZO (SPSA with the seed trick) and the plain in-memory ZO step.

z for parameter ``i`` (its index among the model's unique trainable parameters) at step seed ``s`` and
sample ``j`` is drawn from a generator seeded with ``param_seed(s, i, j)``. z is never stored: every phase
draws it again (+εz, -2εz, then the restore +εz and the update in one pass with one draw, in place). Because the seed depends on the parameter and not on the order in
which parameters are visited, any schedule (in-place, fused per block, streamed, sliced across ranks) draws
the same z for the same parameter.

Arithmetic, shared by every engine so that they agree bit for bit (MeZO's in-place order, restore drift
included)::

    p += ε z_j ;  f⁺_j = f(θ)      p -= 2ε z_j ;  f⁻_j = f(θ)      p += ε z_j         (each sample j)
    g_j = (f⁺_j - f⁻_j) / 2ε              one-sided: f⁰ = f(θ) first, p += ε z_j; f⁺_j; p -= ε z_j;
                                           g_j = (f⁺_j - f⁰) / ε
    p -= lr * (Σ_j (g_j / q) z_j + wd * p)         (wd = 0 for names matching ``no_decay``)
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from plait.step import lr_factor

MASK64 = (1 << 64) - 1
MAX_DRAW_WORKERS = 4  # threads drawing z side by side on a CPU (a CPU generator draws on one core)
_DRAWS_LOCK = threading.Lock()
SCRATCH_MAX = 1 << 20  # elements: z of a parameter up to this size is drawn into a reused buffer (4 MiB fp32)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def param_seed(step_seed: int, index: int, sample: int = 0) -> int:
    """A 63-bit seed for (step, parameter, sample): independent streams per parameter."""
    return _splitmix64(_splitmix64(_splitmix64(step_seed) ^ index) ^ (sample * 0x632BE59BD9B4E019)) >> 1


def step_seed(run_seed: int, step: int) -> int:
    return param_seed(run_seed, step, 0x5EED)


@dataclass
class Param:
    """A unique trainable parameter and what the update needs to know about it."""

    index: int
    name: str
    tensor: torch.nn.Parameter
    decay: bool


def param_table(model: torch.nn.Module, no_decay: Iterable[str]) -> list[Param]:
    """Unique trainable parameters in ``named_parameters()`` order (a tied tensor appears once)."""
    patterns = [p.lower() for p in no_decay]
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.append(Param(len(out), name, p, not any(s in name.lower() for s in patterns)))
    return out


class MeZO:
    """Perturbation strategy ``mezo``: draws z, applies shifts and the SGD update, estimates g."""

    def __init__(self, eps: float, lr: float, weight_decay: float, distribution: str, q: int, one_sided: bool,
                 no_decay: list[str], schedule: str, warmup_steps: int):
        if not eps > 0:
            raise ValueError(f"perturbation.eps must be > 0, got {eps}")
        if not lr > 0:
            raise ValueError(f"perturbation.lr must be > 0, got {lr}")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"perturbation.distribution {distribution!r} is not supported; allowed: gaussian, "
                             f"rademacher")
        if q < 1:
            raise ValueError(f"perturbation.q must be at least 1, got {q}")
        if schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"perturbation.schedule {schedule!r}; allowed: constant, linear, cosine")
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay
        self.distribution, self.q, self.one_sided = distribution, q, one_sided
        self.no_decay, self.schedule, self.warmup_steps = list(no_decay), schedule, warmup_steps
        self.draws = 0  # elements drawn (a counter for tests and logs)
        self._buffers: dict[tuple, torch.Tensor] = {}  # scratch for z per (thread, slot, dtype, device)

    # --- schedule ---------------------------------------------------------------------------------------
    def lr_at(self, step: int, total: int) -> float:
        return self.lr * lr_factor(step, total, self.schedule, self.warmup_steps)

    # --- z ------------------------------------------------------------------------------------------------
    def z(self, p: torch.Tensor, index: int, seed: int, sample: int, slot: int | None = None) -> torch.Tensor:
        """z_j of parameter ``index`` (shape and dtype of ``p``). With ``slot`` (0 or 1) a Gaussian z is drawn into
        this thread's scratch buffer of that slot when it is small enough (`SCRATCH_MAX`): the same numbers as a
        fresh tensor (``randn`` is ``empty().normal_()``) without a new allocation — whose page faults cost as much
        as the draw itself on a CPU. The buffer is overwritten by the next draw into the same slot."""
        g = torch.Generator(device=p.device)
        g.manual_seed(param_seed(seed, index, sample))
        with _DRAWS_LOCK:  # z is drawn from worker threads too
            self.draws += p.numel()
        if self.distribution == "gaussian":
            if slot is not None and p.numel() <= SCRATCH_MAX:
                return self._scratch(slot, p).normal_(generator=g)
            return torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
        return torch.randint(0, 2, p.shape, generator=g, device=p.device).to(p.dtype).mul_(2).sub_(1)

    def _scratch(self, slot: int, p: torch.Tensor) -> torch.Tensor:
        key = (threading.get_ident(), slot, p.dtype, p.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < p.numel():
            buf = self._buffers[key] = torch.empty(max(p.numel(), 1 << 12), dtype=p.dtype, device=p.device)
        return buf[:p.numel()].view(p.shape)

    # --- the chunks of one step -----------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        """Forward passes (batch copies) per step: 2q two-sided, q+1 one-sided."""
        return self.q + 1 if self.one_sided else 2 * self.q

    def shifts(self) -> list[tuple[int, list[float]]]:
        """Per sample j: the in-place shifts (multiples of ε) applied before each forward, then the restore.

        Two-sided: [(j, [+1, -2, +1])]: forward after the 1st and 2nd shift. One-sided: [(j, [+1, -1])]:
        forward after the 1st shift only (the unperturbed forward is chunk 0).
        """
        return [(j, [1.0, -1.0] if self.one_sided else [1.0, -2.0, 1.0]) for j in range(self.q)]

    def estimate(self, losses: list[float]) -> list[float]:
        """Projected gradients g_j from the chunk losses (chunk order as `chunk_of`)."""
        if self.one_sided:
            f0 = losses[0]
            return [(losses[1 + j] - f0) / self.eps for j in range(self.q)]
        return [(losses[2 * j] - losses[2 * j + 1]) / (2 * self.eps) for j in range(self.q)]

    def chunk_of(self, sample: int, shift_index: int) -> int | None:
        """Which forward chunk runs after shift ``shift_index`` of ``sample`` (None: no forward)."""
        if self.one_sided:
            return 1 + sample if shift_index == 0 else None
        return 2 * sample + shift_index if shift_index < 2 else None

    def update(self, p: Param, seed: int, grads: list[float], lr: float,
               restore: tuple[int, float] | None = None) -> None:
        """p -= lr * (Σ_j (g_j/q) z_j + wd p), drawing each z_j again. Skipped if any g_j is not finite.

        ``restore=(j, α)`` first applies sample j's last shift p += α z_j with the same draw of z_j (the in-place
        engine folds its restore into the update: one draw of z per parameter instead of two). The arithmetic
        is unchanged element by element — the restore is rounded before the update reads p, as when the two
        ran as separate passes — so the result is bitwise that of restore-then-update.
        """
        t = p.tensor.data
        finite = all(math.isfinite(g) for g in grads)
        if not finite:
            if restore is not None:
                t.add_(self.z(t, p.index, seed, restore[0], slot=0), alpha=restore[1])
            return
        acc = None
        for j, g in enumerate(grads):
            z = self.z(t, p.index, seed, j, slot=0 if acc is None else 1)
            if restore is not None and j == restore[0]:
                t.add_(z, alpha=restore[1])
            term = z.mul_(g / self.q)  # in place: the same rounding as z * (g / q), one temporary fewer
            acc = term if acc is None else acc.add_(term)
        if p.decay and self.weight_decay:
            t.sub_(acc.add_(torch.mul(t, self.weight_decay)).mul_(lr))  # = lr * (acc + wd * t), element by element
        else:
            t.sub_(acc.mul_(lr))  # = lr * acc


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (fp32 at least; fp64 stays fp64)."""
    v = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def chunk_losses(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool) -> tuple[float, torch.Tensor | None]:
    """A forward's batch loss and, when ``per_sample``, each example's mean token loss over its labelled
    positions (on the CPU: what a private step clips), from one cross-entropy pass over the logits. Without
    ``per_sample`` the loss is `lm_loss` exactly (the estimate uses it); with it, the token mean comes from the
    same per-token losses (it is only logged then: a private estimate reads the per-example losses), which saves
    a second pass over the vocabulary."""
    if not per_sample:
        return float(lm_loss(logits, labels)), None
    v = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    y = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), y.reshape(-1), ignore_index=-100,
                                            reduction="none").view(y.shape)
    mask = (y != -100).to(nll.dtype)
    total, count = (nll * mask).sum(1), mask.sum(1)
    return float(total.sum() / count.sum()), (total / count.clamp_min(1.0)).detach().cpu()


class InPlaceMeZO:
    """Offload policy ``none``: the plain MeZO step with every parameter on the compute device.

    Memory is that of inference plus one parameter-sized z at a time. This is the reference the ``zo2``
    engine must match bit for bit.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, mezo: MeZO, *, fold_restore: bool = True):
        self.model = model.to(device)
        self.device, self.mezo = device, mezo
        # the last restore (+εz) and the update in one pass, one draw of z: bitwise the same parameters as the two
        # passes (`MeZO.update`'s ``restore``); False keeps them apart (a reference that must act in between)
        self.fold_restore = fold_restore
        self.params = param_table(self.model, mezo.no_decay)
        self.stats = {"forwards": 0}
        self.draw_pool = DrawPool(device)
        self.groups = self.draw_pool.groups("all", self.params)

    def _shift(self, seed: int, sample: int, alpha: float) -> None:
        def shift(p: Param) -> None:
            t = p.tensor.data
            t.add_(self.mezo.z(t, p.index, seed, sample, slot=0), alpha=alpha)

        self._each(shift)

    def _each(self, fn) -> None:
        self.draw_pool.run("all", self.params, fn)

    @torch.no_grad()
    def step(self, batch: dict[str, torch.Tensor], seed: int, lr: float) -> tuple[list[float], list[float]]:
        """One ZO step; returns (chunk losses, projected gradients). The update is applied at once."""
        m, eps = self.mezo, self.mezo.eps
        losses: list[float] = [0.0] * m.n_chunks
        want = getattr(m, "wants_sample_losses", False)  # dp_zo: per-example losses from the same forwards
        samples: list[torch.Tensor] = [torch.empty(0)] * m.n_chunks

        def forward(chunk: int) -> None:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            self.stats["forwards"] += 1
            losses[chunk], per = chunk_losses(logits, batch["labels"], want)
            if per is not None:
                samples[chunk] = per

        if m.one_sided:
            forward(0)
        restore = None
        for j, shifts in m.shifts():
            for k, s in enumerate(shifts):
                if self.fold_restore and j == m.q - 1 and k == len(shifts) - 1 and m.chunk_of(j, k) is None:
                    restore = (j, s * eps)  # the last restore is folded into the update (one draw fewer)
                    break
                self._shift(seed, j, s * eps)
                chunk = m.chunk_of(j, k)
                if chunk is not None:
                    forward(chunk)
        grads = m.estimate(losses, samples) if want else m.estimate(losses)
        if restore is None:
            self._each(lambda p: m.update(p, seed, grads, lr))
        else:
            self._each(lambda p: m.update(p, seed, grads, lr, restore=restore))
        return losses, grads

    @torch.no_grad()
    def apply_update(self, seed: int, grads: list[float], lr: float) -> None:
        """The update of projected gradients ``grads`` along this step's z with no forward (a private step's
        noise-only update for an empty Poisson batch)."""
        self._each(lambda p: self.mezo.update(p, seed, grads, lr))

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def flush(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def close(self) -> None:
        self.draw_pool.close()
        self.groups = [self.params]


class DrawPool:
    """Runs ``fn(p)`` over parameters split into groups of about equal size, side by side in worker threads.

    On a CPU a generator draws serially (one core), so a ZO step's z draws leave the other cores idle. z is drawn
    per parameter from its own seed and the parameters are independent, so the result is the same bit for bit in
    any split or order. One group per intra-op thread (at most `MAX_DRAW_WORKERS`); on other devices, or after
    ``close``, everything runs on the calling thread.
    """

    def __init__(self, device: torch.device):
        self.workers = min(torch.get_num_threads(), MAX_DRAW_WORKERS) if device.type == "cpu" else 1
        self.pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="plait-z") if self.workers > 1 else None
        self._groups: dict = {}

    def groups(self, key, params: list[Param]) -> list[list[Param]]:
        if key not in self._groups:
            self._groups[key] = _balanced(params, self.workers if self.pool is not None else 1)
        return self._groups[key]

    def run(self, key, params: list[Param], fn) -> dict[int, object]:
        """``{p.index: fn(p)}`` for every parameter; ``key`` names the (fixed) list, whose split is cached."""
        groups = self.groups(key, params)
        if self.pool is None or len(groups) < 2:
            return {p.index: fn(p) for p in params}
        futures = [self.pool.submit(lambda ps=ps: {p.index: fn(p) for p in ps}) for ps in groups[1:]]
        out = {p.index: fn(p) for p in groups[0]}
        for f in futures:
            out.update(f.result())
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            self._groups.clear()


def _balanced(params: list[Param], n: int) -> list[list[Param]]:
    """``params`` in ``n`` groups of about equal element count (largest first onto the lightest group)."""
    groups: list[list[Param]] = [[] for _ in range(max(1, n))]
    sizes = [0] * len(groups)
    for p in sorted(params, key=lambda p: -p.tensor.numel()):
        i = sizes.index(min(sizes))
        groups[i].append(p)
        sizes[i] += p.tensor.numel()
    return [g for g in groups if g] or [[]]
