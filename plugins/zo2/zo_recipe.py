"""Recipe ``zo``: forward-only (zeroth-order) fine-tuning of causal LMs with the prompt + label-word loss.

The ZO step is done by an engine chosen by the ``offload:`` section: ``none`` (plain in-place MeZO, every
parameter on the device; the default) or ``zo2`` (fused dual forward with blocks streamed from host memory or
disk). Both give the same numbers; ``zo2`` needs a fraction of the device memory.

A ``parallel:`` strategy that adapts the ZO step (DistZO2's ``zo_ddp`` / ``pertp`` / ``zo_2d``: optional members
``wrap_perturbation``, ``wrap_engine``, ``local_batch``, ``metrics``) splits each step across processes.

    plait run configs/zo2/opt.yaml
"""
from __future__ import annotations

import math
from typing import Any

from plait.errors import ConfigError
from plait.plugins.basics.data import collate
from plait.plugins.basics.evaluation import evaluate_lm
from plait.plugins.basics.parts import build_lm, check_positive, load_text_splits
from plait.run import Run, train_loop
from plait.step import BatchOrder

from .config import ZORecipeConfig
from .mezo import InPlaceMeZO, step_seed


class ZORecipe:
    # a step whose projected gradient is not finite updates nothing (`MeZO.update` skips it in every engine, and
    # DistZO2's ranks all see the same gathered g), so ``run.on_nonfinite=skip`` needs no copy of the model per
    # step: a copy the disk tier could not even hold. The DP-ZO accountant keeps counting such a step.
    skips_nonfinite = True

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = ZORecipeConfig(**options)
        if c.grad_accum != 1:
            raise ConfigError(f"recipe.grad_accum: zo estimates one projected gradient per step from one batch; "
                              f"got {c.grad_accum}, allowed: 1 (raise recipe.batch_size instead)")
        check_positive(c, ("batch_size", "max_length", "eval_batch_size"))
        self.device = run.device
        model, self.tokenizer = build_lm(run)
        model.eval()  # ZO steps run without dropout, as MeZO does
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("transforms: every parameter is frozen; zo has nothing to train")
        self.mezo = run.build("perturbation")
        self.private = None  # dp_zo: per-example projected gradients clipped and noised (plugins/flashdp/dp_zo.py)
        if run.has("grad_transform"):
            transform = run.build("grad_transform")
            members = list(getattr(transform, "members", [transform]))
            if len(members) != 1 or not hasattr(members[0], "prepare_zo"):
                raise ConfigError("grad_transform: the zo recipe takes one zeroth-order transform (dp_zo); "
                                  "first-order transforms need a gradient recipe such as sft")
            self.private = members[0]
        self.parallel = run.parallel if hasattr(run.parallel, "wrap_perturbation") else None
        if self.private is not None:
            from plait.plugins.flashdp.dp_zo import PrivateMeZO

            self.private_mezo = PrivateMeZO(self.mezo, self.private)
            self.mezo = self.private_mezo
        if self.parallel is not None:
            self.mezo = self.parallel.wrap_perturbation(self.mezo)
        if run.has("offload"):
            self.engine = run.build("offload", model=model, device=self.device, mezo=self.mezo, run_dir=run.dir)
        else:
            self.engine = InPlaceMeZO(model, self.device, self.mezo)
        if self.parallel is not None:
            self.engine = self.parallel.wrap_engine(self.engine, self.mezo)
        self.world_size = int(getattr(run.parallel, "world_size", 1))
        splits = load_text_splits(run, self.tokenizer, c.max_length, c.eval_examples)
        self.data, self.train_items = splits.data, splits.train_items
        self.eval_examples, self.eval_items = splits.eval_examples, splits.eval_items
        self.order = BatchOrder(len(self.train_items), c.batch_size, run.cfg.run.seed)
        self.skipped = 0
        if self.private is not None:
            try:
                self.private.prepare_zo(dataset_size=len(self.train_items), batch_size=c.batch_size,
                                        steps=int(run.cfg.run.steps), seed=int(run.cfg.run.seed),
                                        perturbations=int(self.private_mezo.inner.q), parallel=run.parallel)
            except ValueError as exc:
                raise ConfigError(f"grad_transform: {exc}") from exc

    def __call__(self) -> dict[str, Any]:
        try:
            result = train_loop(self.run, self)
        finally:
            self.engine.close()
        if self.private is not None:
            result.update(self.private.summary())
        return result

    # --- Task protocol -----------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        rc = self.run.cfg.run
        lr = self.mezo.lr_at(step, rc.steps)
        sampled = self.private.batch_indices(step) if self.private is not None else None
        indices = sampled if sampled is not None else self.order(step - 1)
        if self.private is not None:
            self.private_mezo.step_index = step
            if not indices:  # an empty Poisson batch still releases its noise (every rank alike)
                grads = self.private_mezo.noise_only()
                self.engine.apply_update(step_seed(rc.seed, step), grads, lr)
                return {"train/lr": lr, "train/empty_batches": 1.0}
        if self.parallel is not None:
            glob = indices
            indices = self.parallel.local_batch(glob, uneven=sampled is not None)
            # an empty share still runs the step's shifts (a stand-in example whose losses are not reported),
            # so that every rank's parameters go through the same floating-point sequence
            self.mezo.exclude_local_samples = not indices
            indices = indices or glob[:1]
        items = [self.train_items[i] for i in indices]
        batch = {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}
        losses, grads = self.engine.step(batch, step_seed(rc.seed, step), lr)
        finite = all(math.isfinite(g) for g in grads)
        self.skipped += 0 if finite else 1
        metrics = {"train/loss": sum(losses) / len(losses), "train/lr": lr,
                   "train/skipped_steps": float(self.skipped)}
        if finite:
            metrics["train/projected_grad"] = sum(grads) / len(grads)
        stats = getattr(self.engine, "stats", None)
        if stats is not None and hasattr(stats, "bytes_up"):
            metrics["perf/upload_mib"] = stats.bytes_up / 2**20
            metrics["perf/offload_mib"] = stats.bytes_down / 2**20
            metrics["mem/max_resident_blocks"] = float(stats.max_resident)
        if self.parallel is not None:
            metrics.update(self.parallel.metrics())
        return metrics

    def log_metrics(self, step: int) -> dict[str, float]:
        return self.private.log_metrics(step) if self.private is not None else {}

    def evaluate(self) -> dict[str, float]:
        self.engine.flush()

        def forward(ids, mask):
            return self.engine.logits({"input_ids": ids, "attention_mask": mask})

        return evaluate_lm(forward, self.tokenizer, self.eval_items, self.eval_examples,
                           getattr(self.data, "label_words", None), self.cfg.max_length, self.cfg.eval_batch_size,
                           self.device)

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.engine.state_dict(), "skipped": self.skipped, "world_size": self.world_size}
        if self.private is not None:
            state["grad_transform"] = self.private.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = int(state.get("world_size", 1))
        if saved != self.world_size:
            raise ConfigError(f"run.resume: the checkpoint was written by {saved} process(es); resume with the "
                              f"same world size (this run has {self.world_size})")
        self.engine.load_state_dict(state["model"])
        self.skipped = int(state.get("skipped", 0))
        if self.private is not None:
            self.private.load_state_dict(state["grad_transform"])
