"""Recipe ``sam_train``: train ``tabular_mlp`` on a tabular dataset (``digits`` / ``breast_cancer``) with SAM /
ASAM inside `plait.run.train_loop`, optionally recording the trajectory (``record_trajectory: true`` →
``<run dir>/trajectory/``, the format of `sam.save_trajectory`) for the trajectory estimators. ``summary.json``
gets a ``sam_if`` block that ``plait attribute`` reads.

The recipe is the objective (cross-entropy + (l2/2)‖w‖², `batch_indices` / `mean_loss` / `sample_losses`); the
shared ``plait.step.FirstOrderStep`` moves the parameters (SGD with ``momentum``, the recipe's LR schedule). The
recipe's own SAM (rho, adaptive, eta, eps) is the first member of the step's ``grad_transform:`` chain, followed
by whatever the config's ``grad_transform:`` section holds:

* none: SAM, the gradient at w + e with e from this batch's gradient (bit-identical to `sam.sam_gradient`);
* a private transform (``{name: flashdp, noise_multiplier: 1.0}``, ``dp_flat``): DP-SAT (`sam.SAMTransform`,
  ``compose_before_private``): e from the previous step's privatized gradient, the batch read once, by the private
  transform, so the accountant counts exactly DP-SGD's mechanisms; rho = 0 is DP-SGD. The per-sample losses are
  then the cross-entropies alone and (l2/2)‖w‖² enters as SGD weight decay (the same update; a data-independent
  term must not pass through the per-sample clipping);
* a ``sam`` entry is refused (the recipe already does SAM: set ``recipe.rho``).

m-sharpness (``m`` < batch: one perturbation per group of m examples) has no chain form: it keeps the direct
`sam.sam_gradient` step (same optimizer, same schedule), and is refused together with a ``grad_transform:``.
``transforms:`` (e.g. ``freeze``) act on the model before anything else; frozen parameters are neither perturbed,
updated nor recorded.

The records recorded so far travel in every checkpoint (``state_dict()["trajectory"]``: T × p weights plus the
perturbations), so a resumed run writes the same trajectory as an uninterrupted one. Each record's ``e`` is the
perturbation the step's gradient was taken at (DP-SAT: the one from the previous private gradient, zero at step
1 and for rho = 0); ``batch`` the examples it read (DP: the Poisson batch). The trajectory's metadata carries the
optimizer's ``momentum`` (and ``grad_transform`` / ``sam_mode`` for a private run).

    plait run configs/sam_if/digits.yaml
    plait run configs/compose/dp_sam_digits.yaml        # DP-SAT (flashdp, ε = 8)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from plait.errors import ConfigError
from plait.run import Run, eval_share, eval_sum, train_loop
from plait.step import FirstOrderStep, TransformChain

from .config import SAMTrainConfig, check_sam_train_components
from .sam import SAMTransform, lr_at, sam_gradient, save_trajectory, trainable_params

TRAJECTORY_DIR = "trajectory"


class _Step(FirstOrderStep):
    """`FirstOrderStep` with sam_train's schedule: counted from 0, decaying to ``lr·min_lr_ratio`` at the last
    step (`sam.lr_at`; FirstOrderStep's `lr_factor` reaches it one step later)."""

    def __init__(self, *args: Any, base_lr: float, **kw: Any):
        super().__init__(*args, **kw)
        self.base_lr = base_lr

    def lr_at(self, step: int) -> float:
        return lr_at(step - 1, self.total, self.base_lr, self.schedule, self.min_lr_ratio)


class SAMTrainRecipe:
    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = SAMTrainConfig(**options)
        if c.rho < 0:
            raise ConfigError(f"recipe.rho: must be >= 0, got {c.rho}")
        if c.lr <= 0:
            raise ConfigError(f"recipe.lr: must be positive, got {c.lr}")
        if c.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"recipe.schedule: {c.schedule!r} is not supported; allowed: constant, linear, cosine")
        if c.batch_size < 0 or c.record_every < 1 or (c.m is not None and c.m < 1):
            raise ConfigError("recipe: batch_size must be >= 0, record_every >= 1 and m >= 1 (or null)")
        if c.momentum < 0:
            raise ConfigError(f"recipe.momentum: must be >= 0, got {c.momentum}")
        check_sam_train_components(run.components)  # also run by `plait validate` (check_components)
        user = _user_chain(run)  # (names, private flags) of the grad_transform: section, or None
        self.data = data = run.build("data")
        if not (hasattr(data, "train") and hasattr(data.train, "X") and hasattr(data, "test")):
            raise ConfigError(f"data {run.cfg.data.name!r}: sam_train needs a tabular dataset with train/test "
                              f"splits (digits, breast_cancer)")
        model = run.build("model")
        mc = run.cfg.model
        if mc.get("num_features") != data.n_features or mc.get("num_classes") != data.n_classes:
            raise ConfigError(f"model: num_features={mc.get('num_features')}, num_classes={mc.get('num_classes')} "
                              f"do not match data {data.name!r} ({data.n_features} features, {data.n_classes} classes)")
        for transform in run.build_transforms():
            model = transform(model)
        self.dtype = next(model.parameters()).dtype
        self.X, self.y = data.train.X.to(self.dtype), data.train.y
        self.Xt, self.yt = data.test.X.to(self.dtype), data.test.y
        self.n = self.X.shape[0]
        batch = c.batch_size if 0 < c.batch_size < self.n else self.n
        self.msharp = c.m is not None and c.m < batch  # m-sharpness: the direct sam_gradient step
        self.record = c.record_trajectory
        if hasattr(run.parallel, "split_batch") and (self.msharp or self.record):  # a data-parallel placement
            name = getattr(run.parallel, "name", "?")
            raise ConfigError(
                f"recipe.m: m-sharpness steps outside the shared step and would run the whole batch on every rank "
                f"under parallel {name!r}; set recipe.m=null or run it in one process" if self.msharp else
                f"recipe.record_trajectory: under parallel {name!r} each rank reads only its slice of the batch, "
                f"so the trajectory would record rank 0's slice; run it in one process")
        self.sam = SAMTransform(rho=c.rho, adaptive=c.adaptive, eta=c.eta, eps=c.eps, replay_forward=False)
        self.sam.keep_perturbation = self.record  # the trajectory records the e each gradient was taken at
        members, names = [self.sam], ["sam"]
        if user is not None:
            built = run.build("grad_transform")
            if isinstance(built, TransformChain):
                members, names = members + list(built.members), names + list(built.names)
            else:
                members, names = members + [built], names + user[0]
            if any(user[1]):
                self.sam.compose_before_private()
        self.user_transform = user is not None
        chain = TransformChain(members, names)
        # a private step sums per-sample losses: (l2/2)‖w‖² must not pass through per-sample clipping, so it is the
        # optimizer's weight decay there (SGD adds l2·w to the gradient before momentum: the same update)
        self.reg_in_loss = chain.loss_reduction != "sum"
        self.step = _Step(run, model, self, optimizer="sgd", lr=c.lr, momentum=c.momentum,
                          weight_decay=0.0 if self.reg_in_loss else c.l2, schedule=c.schedule,
                          min_lr_ratio=c.min_lr_ratio, max_grad_norm=0.0, grad_accum=1, batch_size=batch,
                          dataset_size=self.n, transform=chain, base_lr=c.lr)
        self.model, self.optimizer = self.step.model, self.step.optimizer
        self.params = trainable_params(self.model)  # after the transforms' prepare (DP may freeze layers)
        self.rec: dict[str, list] = {"w": [], "e": [], "lr": [], "batch": [], "step": []}
        self._perms: dict[int, torch.Tensor] = {}
        self._read: torch.Tensor | None = None  # the examples this step's loss read first

    def _batch(self, step: int) -> torch.Tensor:
        bs = self.cfg.batch_size
        if not bs or bs >= self.n:
            return torch.arange(self.n)
        start = (step - 1) * bs
        out = []
        for p in range(start, start + bs):
            epoch = p // self.n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.run.cfg.run.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g)}
            out.append(int(self._perms[epoch][p % self.n]))
        return torch.tensor(out, dtype=torch.long)

    def _closure(self, ix: torch.Tensor):
        def fn():
            return self.mean_loss(ix)
        return fn

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        c = self.cfg
        traj = None
        extra = {}
        if self.user_transform:
            extra = {"grad_transform": self.step.transform.names[1:], "sam_mode": "dp-sat" if self.sam.private
                     else "sam"}
        if self.record and self.rec["w"]:
            save_trajectory(self.run.dir / TRAJECTORY_DIR, self.rec,
                            dict(rho=c.rho, adaptive=c.adaptive, eta=c.eta, eps=c.eps, l2=c.l2, m=c.m,
                                 batch_size=c.batch_size or None, record_every=c.record_every,
                                 seed=self.run.cfg.run.seed, n_train=self.n, steps=len(self.rec["step"]),
                                 momentum=c.momentum, **extra))
            traj = TRAJECTORY_DIR
        data_opts = {k: v for k, v in dict(self.run.cfg.data).items() if k != "name"}
        result["sam_if"] = {"dataset": self.data.name, "data_options": data_opts, "rho": c.rho,
                            "adaptive": c.adaptive, "l2": c.l2, "m": c.m, "momentum": c.momentum, "trajectory": traj,
                            "n_train": self.n, "n_test": int(self.Xt.shape[0]),
                            "n_flipped": int(len(self.data.flipped)), **extra}
        if self.user_transform:
            result.update(self.step.summary())
        return result

    # --- Objective (plait.step) ----------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> torch.Tensor:
        return self._batch(step)

    def _note(self, ix) -> None:
        if self._read is None:
            self._read = torch.as_tensor(ix, dtype=torch.long).clone()

    def mean_loss(self, ix) -> torch.Tensor:
        """The batch objective: mean cross-entropy + (l2/2)‖w‖² (the regulariser only where it is not the
        optimizer's weight decay)."""
        self._note(ix)
        loss = torch.nn.functional.cross_entropy(self.model(self.X[ix]), self.y[ix])
        if not self.reg_in_loss:
            return loss
        return loss + 0.5 * self.cfg.l2 * sum((p * p).sum() for p in self.params)

    def sample_losses(self, ix) -> torch.Tensor:
        """Each example's cross-entropy (a private step sums them; l2 is then weight decay)."""
        self._note(ix)
        return torch.nn.functional.cross_entropy(self.model(self.X[ix]), self.y[ix], reduction="none")

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        w_before = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.record else None
        self._read = None
        if self.msharp:
            out, lr, e = self._msharp_step(step)
            metrics = {"train/loss": out["loss"], "train/perturbed_loss": out["perturbed_loss"],
                       "train/grad_norm": out["grad_norm"], "train/lr": lr}
        else:
            m = self.step(step)
            lr = m["train/lr"]
            if self.user_transform:
                metrics = m
            else:  # the names sam_train has always logged
                metrics = {"train/loss": m["train/loss"], "train/perturbed_loss": m["sam/perturbed_loss"],
                           "train/grad_norm": m["sam/grad_norm"], "train/lr": lr}
            e = (self.sam.applied if self.sam.applied is not None else torch.zeros_like(w_before)).unsqueeze(0) \
                if self.record else None
            self.sam.applied = None
        if self.record and (step - 1) % c.record_every == 0:
            self.rec["w"].append(w_before)
            self.rec["e"].append(e)
            self.rec["lr"].append(lr)
            self.rec["batch"].append(self._read if self._read is not None else torch.zeros(0, dtype=torch.long))
            self.rec["step"].append(step - 1)
        self._read = None
        return metrics

    def _msharp_step(self, step: int) -> tuple[dict[str, Any], float, torch.Tensor]:
        """m-sharpness: one perturbation per group of m consecutive batch examples (`sam.sam_gradient`)."""
        c = self.cfg
        idx = self._batch(step)
        self._read = idx.clone()
        lr = self.step.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        chunks = list(idx.split(c.m))
        out = sam_gradient(self.model, [(len(ch) / len(idx), self._closure(ch)) for ch in chunks], c.rho,
                           c.adaptive, c.eta, c.eps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out, lr, out["perturbations"]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        mine = eval_share(self.run, len(self.yt))  # this rank's share under ddp (all of it in one process)
        logits, y = self.model(self.Xt[mine.start:mine.stop]), self.yt[mine.start:mine.stop]
        loss, correct, n = eval_sum(self.run, [float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")),
                                               int((logits.argmax(1) == y).sum()), len(y)])
        return {"eval/loss": loss / n, "eval/accuracy": correct / n}

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transforms' values at a logged step (DP's ε so far), not window-averaged."""
        return self.step.log_metrics(step)

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), **self.step.state_dict()}
        if self.record:
            r = self.rec
            state["trajectory"] = {"w": list(r["w"]), "e": list(r["e"]), "batch": list(r["batch"]),
                                   "lr": [float(v) for v in r["lr"]], "step": [int(v) for v in r["step"]]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state)
        if self.record:
            if "trajectory" not in state:
                raise ConfigError("recipe.record_trajectory: the checkpoint being resumed recorded no trajectory "
                                  "(it was trained with record_trajectory=false); resume with "
                                  "recipe.record_trajectory=false or retrain from scratch")
            t = state["trajectory"]
            self.rec = {"w": list(t["w"]), "e": list(t["e"]), "batch": list(t["batch"]), "lr": list(t["lr"]),
                        "step": list(t["step"])}


def _user_chain(run: Run) -> tuple[list[str], list[bool]] | None:
    """Names and private flags of the ``grad_transform:`` section's entries, in order (None without one)."""
    if not run.has("grad_transform"):
        return None
    comps = run.components["grad_transform"]
    comps: Sequence[Any] = comps if isinstance(comps, list) else [comps]
    return [cp.entry.name for cp in comps], [bool(cp.entry.extra.get("private")) for cp in comps]
