"""SAM / ASAM: a gradient transform for first-order recipes, a functional step, and a small trainer that can
record its trajectory for trajectory-based influence.

Perturbation (shared with the influence code, `functional.perturbation`):
SAM e = ρ g/(‖g‖+eps); ASAM e = ρ T²g/(‖Tg‖+eps), T = |w| + η (Foret et al. 2010.01412; Kwon et al. 2102.11600).
The update uses the gradient at w + e; d e/d w is ignored, as in davda54/sam.

Gradient transform ``sam`` (``grad_transform:`` section): the recipe's backward leaves g = ∇L_B(w) in ``.grad``;
the call then perturbs the weights by e, recomputes the batch loss and its gradient at w + e, restores w and leaves
∇L_B(w + e) in ``.grad`` for the optimizer. Recomputing needs the batch: a recipe should hand the transform a
closure (``set_loss_closure(fn)``; ``fn()`` returns the batch loss with the current weights, already divided as
the recipe divides it; the shared ``plait.step.FirstOrderStep`` sets one). A recipe that does not is covered by
*forward replay*: ``prepare`` installs a forward hook that records the inputs of every training forward since
``before_backward``, and the call replays them (each loss divided by ``grad_accum``). Replay re-samples dropout
masks; a closure is exact.

Before a private transform (``grad_transform: [{name: sam}, {name: flashdp}]``) SAM runs as DP-SAT (Park et al.,
ICML 2023, "Differentially Private Sharpness-Aware Training"): the ascent direction is the *previous* step's
privatized gradient ĝ_{t-1} (what the optimizer consumed), so the step moves to w + e with e = ρ ĝ_{t-1}/‖ĝ_{t-1}‖
before the forward (``before_forward``), the private transform clips and noises the per-sample gradients taken
there, and the weights return to w before the optimizer steps (``after_transforms``). The batch is read once per
step, by the private transform: the accountant counts exactly the mechanisms of plain DP-SGD (same σ, q, steps),
and ĝ_{t-1} is post-processing of a released value. Step 1 has no ĝ_0 and is a plain DP-SGD step; ρ = 0 is
DP-SGD exactly. ĝ_{t-1} is checkpointed, so a resume is exact.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from plait.step import lr_factor

from .functional import as_xy, perturbation

LossFn = Callable[[], torch.Tensor]


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters SAM perturbs and the optimizer updates (requires_grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _add_flat(params: Sequence[torch.Tensor], v: torch.Tensor, alpha: float = 1.0) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(v[offset:offset + n].view_as(p).to(p.dtype), alpha=alpha)
            offset += n


def _set_grad(params: Sequence[torch.Tensor], v: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = v[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def _zero(params):
    for p in params:
        p.grad = None


def sam_gradient(model: torch.nn.Module, loss_fns: LossFn | Sequence[tuple[float, LossFn]], rho: float,
                 adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12) -> dict[str, Any]:
    """Leave the SAM gradient Σ_k π_k ∇L_k(w + e_k) in ``.grad`` (weights unchanged on return).

    ``loss_fns`` is one closure (plain SAM) or ``[(π_k, closure_k), …]`` (m-sharpness: one perturbation per
    group). Returns ``loss`` (Σ π_k L_k(w)), ``perturbed_loss``, ``grad_norm`` (‖Σ π_k ∇L_k(w)‖) and
    ``perturbations`` (flat e_k, one row per group).
    """
    groups = [(1.0, loss_fns)] if callable(loss_fns) else list(loss_fns)
    params = trainable_params(model)
    w = torch.cat([p.detach().reshape(-1) for p in params])
    total = torch.zeros_like(w)
    g_sum = torch.zeros_like(w)
    es, loss, ploss = [], 0.0, 0.0
    for weight, fn in groups:
        _zero(params)
        lk = fn()
        lk.backward()
        g = _flat_grad(params).to(w.dtype)
        e = perturbation(w, g, rho, adaptive, eta, eps)
        _add_flat(params, e)
        _zero(params)
        try:
            pk = fn()
            pk.backward()
        finally:
            _add_flat(params, e, alpha=-1.0)
        total += weight * _flat_grad(params).to(w.dtype)
        g_sum += weight * g
        es.append(e)
        loss += weight * float(lk.detach())
        ploss += weight * float(pk.detach())
    _set_grad(params, total)
    return {"loss": loss, "perturbed_loss": ploss, "grad_norm": float(g_sum.norm()),
            "perturbations": torch.stack(es)}


def sam_step(model: torch.nn.Module, loss_fn: LossFn | Sequence[tuple[float, LossFn]],
             optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
             eps: float = 1e-12) -> dict[str, Any]:
    """One SAM/ASAM step: g at w, e(g), gradient at w + e, restore w, ``optimizer.step()``."""
    out = sam_gradient(model, loss_fn, rho, adaptive, eta, eps)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    """Learning rate of 0-based ``step``: constant | linear | cosine decay to ``lr·min_lr_ratio`` at the last
    step (`plait.step.lr_factor`, counted from 0)."""
    if steps <= 1:
        return lr
    return lr * lr_factor(step, steps - 1, schedule, 0, min_lr_ratio)


def train_sam(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, *, rho: float = 0.05,
              adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12, l2: float = 0.0, lr: float = 0.5,
              steps: int = 1000, batch_size: int | None = None, m: int | None = None, schedule: str = "constant",
              min_lr_ratio: float = 0.0, momentum: float = 0.0, seed: int = 0,
              sample_weight: torch.Tensor | None = None, record_dir: str | Path | None = None,
              record_every: int = 1, tol: float | None = None) -> dict[str, Any]:
    """Train ``model`` (logits for cross-entropy) with SAM/ASAM + SGD on ``(X, y)``, in place.

    Batch loss: (1/|B|) Σ_{i∈B} c_i ℓ_i + (l2/2)‖w‖² (``c`` = ``sample_weight``, default 1) — the objective of
    `functional.Objective`. ``batch_size=None`` is full batch (fixed order); otherwise a seeded permutation per
    epoch. ``m`` splits each batch into consecutive groups of ``m`` with their own perturbations (m-sharpness).
    ``tol`` stops early once ‖SAM update direction‖ < tol. With ``record_dir`` every ``record_every``-th step's
    weights w_k, perturbations e_k (one per group), lr_k and batch indices are written to
    ``record_dir/trajectory.safetensors`` + ``trajectory.json`` (see `load_trajectory`); the metadata carries
    ``momentum`` (torch SGD: b ← μ b + g, w ← w − η b), which the trajectory estimators apply.
    """
    n = X.shape[0]
    c = torch.ones(n, dtype=X.dtype) if sample_weight is None else torch.as_tensor(sample_weight, dtype=X.dtype)
    params = trainable_params(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    rec: dict[str, list] = {"w": [], "e": [], "lr": [], "batch": [], "step": []}
    losses = []
    last = {}
    k = 0
    for k in range(steps):
        if batch_size is None or batch_size >= n:
            idx = torch.arange(n)
        else:
            if not order:
                order = list(torch.randperm(n, generator=gen).split(batch_size))
            idx = order.pop(0)
        step_lr = lr_at(k, steps, lr, schedule, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = step_lr
        chunks = [idx] if m is None or m >= len(idx) else list(idx.split(m))

        def closure(ix):
            def fn():
                li = torch.nn.functional.cross_entropy(model(X[ix]), y[ix], reduction="none")
                reg = 0.5 * l2 * sum((p * p).sum() for p in params)
                return (c[ix] * li).sum() / len(ix) + reg
            return fn

        w_before = torch.cat([p.detach().reshape(-1) for p in params]) if record_dir else None
        last = sam_gradient(model, [(len(ch) / len(idx), closure(ch)) for ch in chunks], rho, adaptive, eta, eps)
        update_norm = float(_flat_grad(params).norm())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(last["loss"])
        if record_dir is not None and k % record_every == 0:
            rec["w"].append(w_before)
            rec["e"].append(last["perturbations"])
            rec["lr"].append(step_lr)
            rec["batch"].append(idx.clone())
            rec["step"].append(k)
        if tol is not None and update_norm < tol:
            break
    result = {"steps": k + 1, "loss": losses[-1] if losses else float("nan"), "losses": losses,
              "update_norm": update_norm if steps else float("nan")}
    if record_dir is not None:
        save_trajectory(record_dir, rec, dict(rho=rho, adaptive=adaptive, eta=eta, eps=eps, l2=l2, m=m,
                                              batch_size=batch_size, record_every=record_every, seed=seed,
                                              n_train=n, steps=k + 1, momentum=momentum))
    return result


def save_trajectory(path: str | Path, rec: dict[str, list], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    T = len(rec["w"])
    bmax = max((len(b) for b in rec["batch"]), default=0)
    kmax = max((e.shape[0] for e in rec["e"]), default=0)
    p = rec["w"][0].numel() if T else 0
    batch = torch.full((T, bmax), -1, dtype=torch.long)
    pert = torch.zeros(T, kmax, p, dtype=rec["w"][0].dtype if T else torch.float64)
    for t in range(T):
        batch[t, :len(rec["batch"][t])] = rec["batch"][t]
        pert[t, :rec["e"][t].shape[0]] = rec["e"][t]
    tensors = {"weights": torch.stack(rec["w"]) if T else torch.zeros(0, 0), "perturbations": pert,
               "lrs": torch.tensor(rec["lr"], dtype=torch.float64), "batch": batch,
               "steps": torch.tensor(rec["step"], dtype=torch.long)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "trajectory.safetensors"))
    (path / "trajectory.json").write_text(json.dumps({**meta, "records": T, "format": 1}, indent=2))
    return path


def load_trajectory(path: str | Path) -> dict[str, Any]:
    """``{"weights" [T,p], "perturbations" [T,K,p], "lrs" [T], "batch" [T,B] (−1 = padding), "steps" [T],
    "meta": dict}``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "trajectory.safetensors").exists():
        raise FileNotFoundError(f"no trajectory.safetensors in {path} (record one with train_sam(record_dir=...))")
    out: dict[str, Any] = dict(load_file(str(path / "trajectory.safetensors")))
    out["meta"] = json.loads((path / "trajectory.json").read_text())
    return out


class SAMTransform:
    """Gradient transform ``sam``: replaces ∇L_B(w) in ``.grad`` by ∇L_B(w + e) (see the module docstring)."""

    replaces_clipping = False
    loss_reduction = "mean"

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12,
                 replay_forward: bool = True):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.rho, self.adaptive, self.eta, self.eps = float(rho), bool(adaptive), float(eta), float(eps)
        self.replay_forward = replay_forward
        self.loss_closure: LossFn | None = None
        self._calls: list[tuple[tuple, dict]] = []
        self._replaying = False
        self._grad_accum = 1
        self._handle = None
        self._model: torch.nn.Module | None = None
        self.private = False  # DP-SAT: ascent from the previous privatized gradient (compose_before_private)
        self._prev: torch.Tensor | None = None  # ĝ_{t-1}, flat
        self._e: torch.Tensor | None = None  # the perturbation applied this step (DP-SAT)
        self.ascents = 0  # steps whose gradient was taken at a perturbed point
        self.keep_perturbation = False  # keep `applied` after the step (e.g. a recorded trajectory)
        self.applied: torch.Tensor | None = None  # flat e this step's gradient was taken at (None: none), if kept

    def compose_before_private(self) -> None:
        """Called by the core when a private transform follows in the chain: become DP-SAT (no second read of
        the batch; the ascent uses the previous step's privatized gradient)."""
        self.private = True
        self.replay_forward = False

    # --- recipe hooks --------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, *, dataset_size: int = 0, batch_size: int = 0, steps: int = 0,
                seed: int = 0, grad_accum: int = 1) -> torch.nn.Module:
        self._grad_accum = max(1, int(grad_accum))
        self._model = model
        if self.replay_forward and self._handle is None:
            self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)
        return model

    def set_loss_closure(self, fn: LossFn | None) -> None:
        """What a recipe should call each step: ``fn()`` → the step's loss at the current weights."""
        self.loss_closure = fn

    def before_backward(self, step: int) -> None:
        self._calls.clear()

    def _record(self, module, args, kwargs):
        if not self._replaying and module.training and torch.is_grad_enabled():
            self._calls.append((args, kwargs))

    def _replay(self) -> torch.Tensor:
        if not self._calls:
            raise RuntimeError("sam: no loss closure was set and no training forward was recorded this step; the "
                               "recipe must call set_loss_closure(fn) or run the model after before_backward(step)")
        total = 0.0
        self._replaying = True
        try:
            for args, kwargs in self._calls:
                out = self._model(*args, **kwargs)
                loss = out.loss if hasattr(out, "loss") else out
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise RuntimeError("sam forward replay needs the model to return a scalar loss (or .loss); "
                                       "give the transform a loss closure instead")
                (loss / self._grad_accum).backward()
                total += float(loss.detach()) / self._grad_accum
        finally:
            self._replaying = False
        return torch.tensor(total)

    def before_forward(self, model: torch.nn.Module, step: int) -> None:
        """DP-SAT: move to w + ρ ĝ_{t-1}/‖ĝ_{t-1}‖ before the step's forward (nothing at step 1)."""
        self.applied = None
        if not self.private or self._prev is None or self.rho == 0:
            self._e = None
            return
        params = trainable_params(model)
        w = torch.cat([p.detach().reshape(-1) for p in params]).to(self._prev.dtype)
        self._e = perturbation(w, self._prev.to(w.device), self.rho, self.adaptive, self.eta, self.eps)
        _add_flat(params, self._e)
        self.ascents += 1
        if self.keep_perturbation:
            self.applied = self._e

    def after_transforms(self, model: torch.nn.Module, step: int) -> None:
        """DP-SAT: keep ĝ_t (the privatized gradient the optimizer is about to use) and return to w."""
        if not self.private:
            return
        params = trainable_params(model)
        self._prev = _flat_grad(params).detach().clone()
        if self._e is not None:
            _add_flat(params, self._e, alpha=-1.0)
            self._e = None

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        if self.private:  # DP-SAT: the gradient in .grad was taken at w + e already
            return {"sam/perturbation_norm": float(self._e.norm()) if self._e is not None else 0.0}
        params = [p for p in trainable_params(model)]
        g = _flat_grad(params)
        w = torch.cat([p.detach().reshape(-1) for p in params]).to(g.dtype)
        e = perturbation(w, g, self.rho, self.adaptive, self.eta, self.eps)
        if self.keep_perturbation:
            self.applied = e
        _add_flat(params, e)
        _zero(params)
        try:
            if self.loss_closure is not None:
                loss = self.loss_closure()
                loss.backward()
                ploss = float(loss.detach())
            else:
                self._model = self._model or model
                ploss = float(self._replay())
        finally:
            _add_flat(params, e, alpha=-1.0)
            self._calls.clear()
        self.ascents += 1
        return {"sam/grad_norm": float(g.norm()), "sam/perturbation_norm": float(e.norm()),
                "sam/perturbed_loss": ploss}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ascents": self.ascents}
        if self._prev is not None:
            state["prev_grad"] = self._prev
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ascents = int(state.get("ascents", 0))
        self._prev = state.get("prev_grad")

    def summary(self) -> dict[str, Any]:
        return {"sam/rho": self.rho, "sam/ascent_steps": self.ascents, "sam/mode": "dp-sat" if self.private else
                "sam"}


def fit_xy(model, data, **kw):
    """`train_sam` on ``data`` given as ``(X, y)`` or a `data.Split`."""
    X, y = as_xy(data)
    return train_sam(model, X, y, **kw)
