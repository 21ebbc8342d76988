"""Recipe ``sam_train``: train ``tabular-mlp`` on a tabular dataset (``digits`` / ``breast-cancer``) with SAM /
ASAM (`sam.sam_gradient`, the step of `sam.train_sam`) inside `plait.run.train_loop`, optionally recording the
trajectory (``record_trajectory: true`` → ``<run dir>/trajectory/``, the format of `sam.save_trajectory`) for the
trajectory estimators. ``summary.json`` gets a ``sam_if`` block that ``plait attribute`` reads.

The records recorded so far travel in every checkpoint (``state_dict()["trajectory"]``: T × p weights plus the
perturbations), so a resumed run writes the same trajectory as an uninterrupted one.

    plait run configs/sam_if/digits.yaml
"""
from __future__ import annotations

from typing import Any

import torch

from plait.errors import ConfigError
from plait.run import Run, train_loop

from .config import SAMTrainConfig
from .sam import trainable_params, lr_at, sam_gradient, save_trajectory

TRAJECTORY_DIR = "trajectory"


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
        self.data = data = run.build("data")
        if not (hasattr(data, "train") and hasattr(data.train, "X") and hasattr(data, "test")):
            raise ConfigError(f"data {run.cfg.data.name!r}: sam_train needs a tabular dataset with train/test "
                              f"splits (digits, breast-cancer)")
        self.model = run.build("model")
        mc = run.cfg.model
        if mc.get("n_features") != data.n_features or mc.get("n_classes") != data.n_classes:
            raise ConfigError(f"model: n_features={mc.get('n_features')}, n_classes={mc.get('n_classes')} do not "
                              f"match data {data.name!r} ({data.n_features} features, {data.n_classes} classes)")
        self.dtype = next(self.model.parameters()).dtype
        self.X, self.y = data.train.X.to(self.dtype), data.train.y
        self.Xt, self.yt = data.test.X.to(self.dtype), data.test.y
        self.n = self.X.shape[0]
        self.params = trainable_params(self.model)
        self.optimizer = torch.optim.SGD(self.params, lr=c.lr, momentum=c.momentum)
        self.record = c.record_trajectory
        self.rec: dict[str, list] = {"w": [], "e": [], "lr": [], "batch": [], "step": []}
        self._perms: dict[int, torch.Tensor] = {}

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
        l2, params = self.cfg.l2, self.params

        def fn():
            loss = torch.nn.functional.cross_entropy(self.model(self.X[ix]), self.y[ix])
            return loss + 0.5 * l2 * sum((p * p).sum() for p in params)
        return fn

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        c = self.cfg
        traj = None
        if self.record and self.rec["w"]:
            save_trajectory(self.run.dir / TRAJECTORY_DIR, self.rec,
                            dict(rho=c.rho, adaptive=c.adaptive, eta=c.eta, eps=c.eps, l2=c.l2, m=c.m,
                                 batch_size=c.batch_size or None, record_every=c.record_every,
                                 seed=self.run.cfg.run.seed, n_train=self.n, steps=len(self.rec["step"])))
            traj = TRAJECTORY_DIR
        data_opts = {k: v for k, v in dict(self.run.cfg.data).items() if k != "name"}
        result["sam_if"] = {"dataset": self.data.name, "data_options": data_opts, "rho": c.rho,
                            "adaptive": c.adaptive, "l2": c.l2, "m": c.m, "trajectory": traj,
                            "n_train": self.n, "n_test": int(self.Xt.shape[0]),
                            "n_flipped": int(len(self.data.flipped))}
        return result

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        idx = self._batch(step)
        lr = lr_at(step - 1, self.run.cfg.run.steps, c.lr, c.schedule, c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        chunks = [idx] if c.m is None or c.m >= len(idx) else list(idx.split(c.m))
        w_before = torch.cat([p.detach().reshape(-1) for p in self.params]) if self.record else None
        out = sam_gradient(self.model, [(len(ch) / len(idx), self._closure(ch)) for ch in chunks], c.rho,
                           c.adaptive, c.eta, c.eps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.record and (step - 1) % c.record_every == 0:
            self.rec["w"].append(w_before)
            self.rec["e"].append(out["perturbations"])
            self.rec["lr"].append(lr)
            self.rec["batch"].append(idx.clone())
            self.rec["step"].append(step - 1)
        return {"train/loss": out["loss"], "train/perturbed_loss": out["perturbed_loss"],
                "train/grad_norm": out["grad_norm"], "train/lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        logits = self.model(self.Xt)
        return {"eval/loss": float(torch.nn.functional.cross_entropy(logits, self.yt)),
                "eval/accuracy": float((logits.argmax(1) == self.yt).double().mean())}

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.record:
            r = self.rec
            state["trajectory"] = {"w": list(r["w"]), "e": list(r["e"]), "batch": list(r["batch"]),
                                   "lr": [float(v) for v in r["lr"]], "step": [int(v) for v in r["step"]]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.record:
            if "trajectory" not in state:
                raise ConfigError("recipe.record_trajectory: the checkpoint being resumed recorded no trajectory "
                                  "(it was trained with record_trajectory=false); resume with "
                                  "recipe.record_trajectory=false or retrain from scratch")
            t = state["trajectory"]
            self.rec = {"w": list(t["w"]), "e": list(t["e"]), "batch": list(t["batch"]), "lr": list(t["lr"]),
                        "step": list(t["step"])}
