"""Recipe ``classify``: from-scratch training of ``pit`` / ``vit`` on imbalanced capsule images.

Imbalance handling (the paper's own choice is unknown): plain CE, class-weighted CE (w_c ∝ 1/n_c or Cui et
al.'s effective number (1−β)/(1−β^{n_c}), normalised to mean 1), focal loss (optionally weighted), and a
class-balanced sampler. Inputs are standardised per channel with training-set statistics: raw [0, 1] capsule
images share a large common colour, and without centring every token of a from-scratch ViT looks alike, so
the class token barely depends on the image (measurements: docs/capsule.md, "Why the tiny PiT first predicted
one class"). AdamW with linear warm-up then
cosine decay. Evaluation: accuracy, balanced accuracy, macro-F1, MCC, the majority-class reference, and the
confusion matrix as a TensorBoard image.

The recipe is the objective (`batch_indices`, `mean_loss`, `sample_losses`); the shared
`plait.step.FirstOrderStep` moves the parameters, so ``grad_transform:`` (sam, flashdp, dp_flat, chains) and
``transforms:`` (freeze, …) apply. Under DP each example's loss is w_y·ℓ_i (docs/capsule.md, "The shared step").
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.run import Run, eval_gather, eval_share, train_loop
from plait.step import FirstOrderStep, StepProgress

from .config import ClassifyRecipeConfig
from .metrics import classification_metrics, confusion_image, confusion_matrix, prediction_grid

GRID_IMAGES = 16  # test images in the eval/predictions grid

LOSSES = ("ce", "weighted_ce", "focal")


def class_weights(counts: torch.Tensor, scheme: str, beta: float) -> torch.Tensor:
    counts = counts.double().clamp_min(1)
    if scheme == "inverse":
        w = 1 / counts
    elif scheme == "effective":
        w = (1 - beta) / (1 - beta**counts)
    else:
        raise ValueError(f"class_weighting {scheme!r} is not supported; allowed: inverse, effective")
    return (w / w.mean()).float()


def focal_losses(logits: torch.Tensor, y: torch.Tensor, gamma: float,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Lin et al. per example: −w_y (1 − p_y)^γ log p_y, shape [B]."""
    logp = F.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        loss = loss * weight[y]
    return loss


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Lin et al.: −w_y (1 − p_y)^γ log p_y, averaged over the batch."""
    return focal_losses(logits, y, gamma, weight).mean()


class ClassifyRecipe(StepProgress):
    """The objective (batches, augmentation, loss) and the evaluation; `FirstOrderStep` moves the parameters."""

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = ClassifyRecipeConfig(**options)
        if c.loss not in LOSSES:
            raise ConfigError(f"recipe.loss: {c.loss!r} is not supported; allowed: {', '.join(LOSSES)}")
        if c.sampler not in ("uniform", "weighted"):
            raise ConfigError(f"recipe.sampler: {c.sampler!r} is not supported; allowed: uniform, weighted")
        for key in ("batch_size",):
            if getattr(c, key) < 1:
                raise ConfigError(f"recipe.{key}: must be at least 1, got {getattr(c, key)}")
        for key in ("warmup_steps", "weight_decay", "label_smoothing"):
            if getattr(c, key) < 0:
                raise ConfigError(f"recipe.{key}: must be 0 or more, got {getattr(c, key)}")
        self.data = data = run.build("data")
        model = run.build("model")
        for transform in run.build_transforms():  # transforms: (freeze, …), in order
            model = transform(model)
        model = model.to(run.device)
        head = model.head.out_features
        if head != data.num_classes:
            raise ConfigError(f"model.num_classes is {head} but data {data.name!r} has {data.num_classes} classes")
        size = model.pos_embed.shape[-1]
        expected = (data.image_size - model.patch_embed.kernel_size[0]) // model.patch_embed.stride[0] + 1
        if size != expected:
            raise ConfigError(f"model.image_size does not match the data's {data.image_size}px images")
        self.mean = data.train.x.mean((0, 2, 3), keepdim=True)
        self.std = data.train.x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        counts = torch.bincount(data.train.y, minlength=data.num_classes)
        self.weight = class_weights(counts, c.class_weighting, c.beta).to(run.device) if c.loss != "ce" else None
        self.sample_p = (1 / counts.double().clamp_min(1))[data.train.y] if c.sampler == "weighted" else None
        self.gen = torch.Generator().manual_seed(run.cfg.run.seed)
        self._batches: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # images are logged at the training step of the evaluation (0 before training), like the scalars
        self._eval_step = run.resume_state[0] if run.resume_state is not None else 0
        transform = run.build("grad_transform") if run.has("grad_transform") else None
        self.step = FirstOrderStep(run, model, self, optimizer="adamw", lr=c.lr, weight_decay=c.weight_decay,
                                   schedule="cosine", warmup_steps=c.warmup_steps, batch_size=c.batch_size,
                                   dataset_size=len(data.train.y), transform=transform,
                                   param_groups=self._param_groups)
        self.model, self.optimizer, self.grad_transform = self.step.model, self.step.optimizer, transform
        if c.sampler == "weighted" and _samples_batches(self.step.transform):
            raise ConfigError("recipe.sampler: 'weighted' does not apply under this grad_transform: it samples each "
                              "batch itself (Poisson, every example at the same rate, which its privacy accounting "
                              "assumes); use sampler: uniform and loss: weighted_ce or focal for the imbalance")

    def _param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices and conv kernels except the position embedding; none on
        biases, norms, the class token and the position embedding. Frozen parameters are left out."""
        c = self.cfg
        decay = [p for n, p in model.named_parameters() if p.requires_grad and _decays(n, p)]
        other = [p for n, p in model.named_parameters() if p.requires_grad and not _decays(n, p)]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": other, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        result.update(self.step.summary())
        return result

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, (1,), generator=self.gen))
        x = torch.rot90(x, k, (2, 3))
        flip = torch.rand(x.shape[0], generator=self.gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.loss == "focal":
            return focal_loss(logits, y, c.focal_gamma, self.weight)
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=c.label_smoothing)

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses [B], class weight included: w_y·ℓ_i (focal: w_y·(1 − p_y)^γ·(−log p_y)).

        Their mean is `loss` for ``ce`` and ``focal``; for ``weighted_ce`` `loss` is Σ w_y ℓ_i / Σ w_y (torch's
        weighted mean), their sum divided by the batch size instead."""
        c = self.cfg
        if c.loss == "focal":
            return focal_losses(logits, y, c.focal_gamma, self.weight)
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=c.label_smoothing, reduction="none")

    # --- Objective (plait.step) ----------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> list[int]:
        """The step's examples from the recipe's generator: uniform, or class-balanced (``sampler: weighted``)."""
        c, n = self.cfg, len(self.data.train.y)
        if self.sample_p is not None:
            idx = torch.multinomial(self.sample_p, c.batch_size, replacement=True, generator=self.gen)
        else:
            idx = torch.randint(n, (c.batch_size,), generator=self.gen)
        return idx.tolist()

    def loss_weight(self, idx) -> float:
        """What `loss` averages over (a data-parallel step weights each rank's share by it): Σ w_y for a
        class-weighted cross-entropy, else the example count."""
        if self.weight is None or self.cfg.loss == "focal":
            return float(len(idx))
        return float(self.weight.cpu()[self.data.train.y[torch.as_tensor(list(idx), dtype=torch.long)]].sum())

    def _batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised, augmented inputs and labels of ``idx`` (drawn by `batch_indices` or a transform's
        Poisson sampling). Built once per step: a second evaluation of the same batch (SAM's ascent) sees the
        same augmentation, and the generator advances as it did before the shared step."""
        key = tuple(int(i) for i in idx)
        if key not in self._batches:
            tr, i = self.data.train, torch.tensor(key, dtype=torch.long)
            x, y = (tr.x[i] - self.mean) / self.std, tr.y[i]
            if self.cfg.augment:
                x = self._augment(x)
            self._batches[key] = (x.to(self.run.device), y.to(self.run.device))
        return self._batches[key]

    def mean_loss(self, idx) -> torch.Tensor:
        """The recipe's batch loss (`loss`: CE with class weights / label smoothing, or focal)."""
        x, y = self._batch(idx)
        return self.loss(self.model(x), y)

    def sample_losses(self, idx) -> torch.Tensor:
        """Each example's loss, w_y·ℓ_i (what a private step sums; see `losses`)."""
        x, y = self._batch(idx)
        return self.losses(self.model(x), y)

    # --- Task protocol -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        self._batches.clear()
        try:
            self._eval_step = step
            return self.step(step)
        finally:
            self._batches.clear()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        self.model.eval()
        x = (x - self.mean) / self.std
        return torch.cat([self.model(x[i:i + 256].to(self.run.device)).argmax(-1).cpu()
                          for i in range(0, len(x), 256)]).numpy()

    def evaluate(self) -> dict[str, float]:
        te, k = self.data.test, self.data.num_classes
        # under a data-parallel placement each rank predicts its share and the predictions are gathered (in
        # order): MCC / balanced accuracy are not sums over examples
        mine = eval_share(self.run, len(te.x))
        part = te.x[mine.start:mine.stop]
        local = torch.from_numpy(self.predict(part)) if len(part) else torch.zeros(0, dtype=torch.long)
        pred, y = eval_gather(self.run, local).numpy(), te.y.numpy()
        metrics = {f"eval/{n}": v for n, v in classification_metrics(y, pred, k).items()}
        majority = int(torch.bincount(self.data.train.y).argmax())
        metrics["eval/majority_accuracy"] = float((y == majority).mean())
        cm = confusion_matrix(y, pred, k)
        writer = self.run.logger.writer
        writer.add_image("eval/confusion_matrix", confusion_image(cm), self._eval_step, dataformats="HWC")
        n = min(GRID_IMAGES, len(y))
        writer.add_image("eval/predictions", prediction_grid(te.x[:n], y[:n], pred[:n]), self._eval_step)
        names = getattr(self.data, "class_names", None) or [str(i) for i in range(k)]
        rows = "\n".join(f"| {i} | {names[int(y[i])]} | {names[int(pred[i])]} |" for i in range(n))
        writer.add_text("eval/predictions", "green frame: right, red: wrong\n\n| image | label | predicted |\n"
                        "|---|---|---|\n" + rows, self._eval_step)
        return metrics

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transforms' values at a logged step (e.g. DP's ε so far), not window-averaged."""
        return self.step.log_metrics(step)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (+ the grad transform's state) and the batch/augmentation generator: all a
        bit-identical resume needs (the LR is a function of the step)."""
        return {"model": self.model.state_dict(), **self.step.state_dict(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before the generator was saved still load (they resume on different batches)."""
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state)
        if "generator" in state:
            self.gen.set_state(state["generator"])


def _samples_batches(chain) -> bool:
    """Whether a member of the ``grad_transform:`` chain draws the batches (DP's Poisson sampling)."""
    return chain is not None and any(hasattr(m, "batch_indices") and getattr(m, "poisson", True) for m in chain)


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.dim() > 1 and "pos_embed" not in name
