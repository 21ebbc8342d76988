"""Recipe ``depth``: self-supervised depth + ego-motion training of ``v2_sfmlearner`` on frame triplets.

Per step: a batch of (t−1, t, t+1) triplets with the IMU windows of both pairs; the depth of frame t at every
scale (upsampled to full resolution), the poses T_{t−1<−t} (pair [t−1, t], inverted) and T_{t+1<−t} (pair
[t, t+1]); inverse warps of both sources; per-pixel minimum SSIM+L1 reprojection with auto-masking; edge-aware
smoothness weighted 1/2^scale; mean over scales; for V2 with ``gyro_weight`` > 0 also the auxiliary gyro loss
(predicted rotation vs the integrated gyro). Evaluation on the test split: median-scaled depth metrics against
the best constant depth, 5-frame ATE against zero-motion and constant-velocity baselines, the frame-to-frame
rotation error (RPE-rot, degrees) against zero motion, both with the IMU windows shuffled across snippets
(V2 only), and depth/warp images in TensorBoard.

The recipe is the objective (`batch_indices`, `mean_loss`, `sample_losses`: per snippet); the shared
`plait.step.FirstOrderStep` moves the parameters (Adam; ``lr_step`` is the schedule ``step``), so
``grad_transform:`` and ``transforms:`` apply — except a private transform: the encoders' BatchNorm couples the
samples of a batch, so DP is refused.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.run import Run, train_loop
from plait.step import FirstOrderStep, StepProgress

from . import geometry as geo
from .config import DepthRecipeConfig
from .losses import min_reprojection, photometric_error, smoothness
from .metrics import ate, best_constant_abs_rel, chain_positions, colorize, median_scaled_metrics, rotation_error_deg


class DepthRecipe(StepProgress):
    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = DepthRecipeConfig(**options)
        if c.batch_size < 1 or c.lr <= 0 or c.eval_snippet < 2:
            raise ConfigError("recipe: batch_size must be >= 1, lr > 0 and eval_snippet >= 2")
        if c.lr_step < 0:
            raise ConfigError(f"recipe.lr_step: must be 0 (constant LR) or more, got {c.lr_step}")
        for key in ("smoothness", "gyro_weight"):
            if not getattr(c, key) >= 0:  # a negative weight would reward the error it is meant to penalise
                raise ConfigError(f"recipe.{key}: must be a loss weight >= 0, got {getattr(c, key)}")
        self.data = data = run.build("data")
        if not hasattr(data, "k_norm") or data.k_norm is None:
            raise ConfigError(f"data {run.cfg.data.name!r}: camera intrinsics are missing; the depth recipe needs "
                              f"k_norm (normalised 3x3 intrinsics)")
        if data.test.c2w is not None and c.eval_snippet > data.test.num_frames:  # no snippet fits: NaN ATE
            raise ConfigError(f"recipe.eval_snippet: {c.eval_snippet} frames is longer than the test sequences of "
                              f"{data.test.num_frames} frames; allowed: 2 to {data.test.num_frames}")
        h, w = data.image_size
        model = run.build("model", height=h, width=w, imu_window=data.imu_window, imu_rate=data.imu_rate,
                          min_depth=data.min_depth, max_depth=data.max_depth)
        for transform in run.build_transforms():  # transforms: (freeze, …), in order
            model = transform(model)
        model = model.to(run.device)
        if model.vibration is not None:
            model.vibration.set_statistics(data.train.imu.flatten(0, 1).to(run.device))
        self.k = geo.scale_intrinsics(data.k_norm, h, w).to(run.device)
        self.inv_k = torch.linalg.inv(self.k)
        s, n = data.train.num_sequences, data.train.num_frames
        self.index = [(i, t) for i in range(s) for t in range(1, n - 1)]
        self.gen = torch.Generator().manual_seed(run.cfg.run.seed)
        self._batches: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._parts: dict[str, float] = {}
        self._eval_step = run.resume_state[0] if run.resume_state is not None else 0
        transform = run.build("grad_transform") if run.has("grad_transform") else None
        # Adam + StepLR(lr_step, 0.1) stepped once per step, as the shared schedule "step"
        self.step = FirstOrderStep(run, model, self, optimizer="adam", lr=c.lr, weight_decay=c.weight_decay,
                                   schedule="step" if c.lr_step else "constant", decay_every=c.lr_step, gamma=0.1,
                                   batch_size=c.batch_size, dataset_size=len(self.index), transform=transform)
        if self.step.sum_loss:  # a private transform: flashdp refuses BatchNorm itself, this covers any other
            refuse_batch_mixing(self.step.model)
        self.model, self.optimizer, self.grad_transform = self.step.model, self.step.optimizer, transform

    def __call__(self) -> dict[str, Any]:
        result = train_loop(self.run, self)
        result.update(self.step.summary())
        return result

    # --- loss ------------------------------------------------------------------------------------------
    def losses(self, frames: torch.Tensor, imu: torch.Tensor, generator: torch.Generator,
               per_sample: bool = False) -> dict[str, torch.Tensor]:
        """frames (B, 3, 3, H, W) = [t−1, t, t+1]; imu (B, 2, 6, T) for pairs (t−1, t) and (t, t+1);
        ``generator`` draws the auto-mask tie-breaking noise.

        ``per_sample``: ``loss`` is each snippet's loss, shape [B] (every term reduced over that snippet's pixels
        only; the smoothness, whose disparity normalisation is per image already, is evaluated image by image),
        and their mean is the batch loss. The other parts are batch means either way."""
        c, m = self.cfg, self.model
        reduce = (lambda v: v.flatten(1).mean(1)) if per_sample else (lambda v: v.mean())
        prev, target, nxt = frames.unbind(1)
        b = target.shape[0]
        k, inv_k = self.k.expand(b, 4, 4), self.inv_k.expand(b, 4, 4)
        params = [m.pose_parameters(prev, target, imu[:, 0]), m.pose_parameters(target, nxt, imu[:, 1])]
        poses = [torch.linalg.inv(geo.transformation_from_parameters(*params[0])),
                 geo.transformation_from_parameters(*params[1])]
        out = m.depth(target)
        scales = m.scales if c.multiscale else [0]
        identity = [photometric_error(src, target, c.ssim_weight) for src in (prev, nxt)] if c.automask else None
        total, photo, smooth_total = 0.0, 0.0, 0.0
        for s in scales:
            disp = out.disp[s]
            disp_full = F.interpolate(disp, size=target.shape[-2:], mode="bilinear", align_corners=False)
            depth = geo.disp_to_depth(disp_full, m.min_depth, m.max_depth)[1]
            reproj = [photometric_error(geo.inverse_warp(src, depth, t, k, inv_k)[0], target, c.ssim_weight)
                      for src, t in zip((prev, nxt), poses)]
            per_pixel, mask = min_reprojection(reproj, identity, generator=generator)
            img_s = F.interpolate(target, size=disp.shape[-2:], mode="bilinear", align_corners=False) if s else target
            if per_sample:
                sm = torch.stack([smoothness(disp[i:i + 1], img_s[i:i + 1]) for i in range(b)])
            else:
                sm = smoothness(disp, img_s)
            photo_s = reduce(per_pixel)
            total = total + photo_s + c.smoothness * sm / 2**s
            photo, smooth_total = photo + photo_s.detach(), smooth_total + sm.detach()
        n = len(scales)
        parts = {"loss": total / n, "photometric": (photo / n).mean(), "smoothness": (smooth_total / n).mean(),
                 "automask_used": mask.mean().detach()}
        if c.gyro_weight > 0 and m.vibration is not None:
            gyro = self.gyro_loss([p[0] for p in params], imu, per_sample)
            parts["loss"] = parts["loss"] + c.gyro_weight * gyro
            parts["gyro"] = gyro.detach().mean()
        return parts

    def gyro_loss(self, axisangles: list[torch.Tensor], imu: torch.Tensor, per_sample: bool = False
                  ) -> torch.Tensor:
        """Mean |ω̂ − (−Σω·dt)| (rad) over both pairs: the predicted rotation of T_{b<-a} = R_bᵀR_a against
        the integrated gyro, which measures R_aᵀR_b (hence the sign). Self-supervised: the gyro is a sensor
        input, not ground truth. ``per_sample``: one value per snippet, [B]."""
        target = [-self.model.vibration.preintegrate(imu[:, i])[:, :3] for i in range(2)]
        if per_sample:
            return torch.stack([(a - t).abs().mean(1) for a, t in zip(axisangles, target)]).mean(0)
        return torch.stack([(a - t).abs().mean() for a, t in zip(axisangles, target)]).mean()

    # --- Objective (plait.step) ----------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> list[int]:
        """The step's snippets (indices into ``self.index``), uniform with replacement from the recipe's
        generator."""
        return torch.randint(len(self.index), (self.cfg.batch_size,), generator=self.gen).tolist()

    def _loss(self, idx, per_sample: bool) -> torch.Tensor:
        """The loss of snippets ``idx`` (drawn by `batch_indices` or a transform's Poisson sampling). The batch
        and the generator state before its auto-mask noise are kept for the step: a second evaluation (SAM's
        ascent) sees the same frames and the same noise and does not advance the training generator."""
        key = tuple(int(i) for i in idx)
        if key in self._batches:
            frames, imu, state = self._batches[key]
            return self.losses(frames, imu, torch.Generator().set_state(state), per_sample)["loss"]
        tr, dev = self.data.train, self.run.device
        seq = torch.tensor([self.index[i][0] for i in key])
        t = torch.tensor([self.index[i][1] for i in key])
        frames = torch.stack([tr.frames[seq, t - 1], tr.frames[seq, t], tr.frames[seq, t + 1]], 1).to(dev)
        imu = torch.stack([tr.imu[seq, t - 1], tr.imu[seq, t]], 1).to(dev)
        self._batches[key] = (frames, imu, self.gen.get_state())
        parts = self.losses(frames, imu, self.gen, per_sample)
        self._parts = {f"train/{k}": float(v.detach().mean()) for k, v in parts.items() if k != "loss"}
        return parts["loss"]

    def mean_loss(self, idx) -> torch.Tensor:
        """The batch loss: photometric (min reprojection, auto-masked) + smoothness (+ gyro), means over the batch."""
        return self._loss(idx, per_sample=False)

    def sample_losses(self, idx) -> torch.Tensor:
        """Each snippet's loss, [B] (what a private step sums; see `losses`)."""
        return self._loss(idx, per_sample=True)

    # --- Task protocol ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        self._batches.clear()
        self._parts = {}
        self._eval_step = step
        try:
            metrics = self.step(step)
        finally:
            self._batches.clear()
        return {**metrics, **self._parts}

    @torch.no_grad()
    def predict_depth(self, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model.depth(frames[i:i + batch].to(self.run.device)).depth.cpu()
                          for i in range(0, len(frames), batch)])

    @torch.no_grad()
    def predict_relative(self, split, imu_perm: torch.Tensor | None = None) -> np.ndarray:
        """T_{k+1<-k} (S, N−1, 4, 4) for every consecutive pair; ``imu_perm`` permutes the IMU windows."""
        self.model.eval()
        s, n = split.num_sequences, split.num_frames
        a = split.frames[:, :-1].flatten(0, 1)
        b = split.frames[:, 1:].flatten(0, 1)
        imu = split.imu.flatten(0, 1)
        if imu_perm is not None:
            imu = imu[imu_perm]
        out = [self.model.pose(a[i:i + 32].to(self.run.device), b[i:i + 32].to(self.run.device),
                               imu[i:i + 32].to(self.run.device)).cpu() for i in range(0, len(a), 32)]
        return torch.cat(out).reshape(s, n - 1, 4, 4).double().numpy()

    @staticmethod
    def _gt_relative(split) -> np.ndarray:
        """Ground-truth T_{k+1<-k} = inv(c2w_{k+1})·c2w_k, (S, N−1, 4, 4)."""
        c2w = split.c2w.double()
        return (torch.linalg.inv(c2w[:, 1:]) @ c2w[:, :-1]).numpy()

    def _snippet_ates(self, split, rel: np.ndarray) -> list[float]:
        L = self.cfg.eval_snippet
        gt = split.c2w.numpy()
        out = []
        for si in range(split.num_sequences):
            for i in range(split.num_frames - L + 1):
                g = np.stack([(np.linalg.inv(gt[si, i]) @ gt[si, i + j])[:3, 3] for j in range(L)])
                out.append(ate(g, chain_positions(list(rel[si, i:i + L - 1]))))
        return out

    def baselines(self) -> dict[str, float]:
        """Zero-motion, constant-velocity (mean training step) and best-constant-depth references."""
        te, tr = self.data.test, self.data.train
        gt_tr = tr.c2w.numpy()
        step = np.mean([(np.linalg.inv(gt_tr[s, i]) @ gt_tr[s, i + 1]) for s in range(tr.num_sequences)
                        for i in range(tr.num_frames - 1)], 0)
        step[:3, :3] = np.eye(3)  # translation-only constant step
        zero = np.tile(np.eye(4), (te.num_sequences, te.num_frames - 1, 1, 1))
        const = np.tile(np.linalg.inv(step), (te.num_sequences, te.num_frames - 1, 1, 1))
        valid = te.valid[:, :, 0].flatten(0, 1)
        return {"eval/ate_zero_motion": float(np.mean(self._snippet_ates(te, zero))),
                "eval/ate_constant_velocity": float(np.mean(self._snippet_ates(te, const))),
                "eval/abs_rel_best_constant": best_constant_abs_rel(te.depth[:, :, 0].flatten(0, 1), valid)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        te, m = self.data.test, self.model
        pred = self.predict_depth(te.frames.flatten(0, 1))
        if te.depth is None:  # real video: no ground truth, report the self-supervised loss on held-out frames
            return {"eval/loss": self._heldout_loss(te)}
        gt, valid = te.depth.flatten(0, 1)[:, 0], te.valid.flatten(0, 1)[:, 0]
        metrics = {f"eval/{k}": v for k, v in
                   median_scaled_metrics(gt, pred[:, 0], valid, m.min_depth, m.max_depth).items()}
        gt_rel = self._gt_relative(te)
        rel = self.predict_relative(te)
        metrics["eval/ate"] = float(np.mean(self._snippet_ates(te, rel)))
        metrics["eval/rpe_rot_deg"] = rotation_error_deg(gt_rel, rel)
        metrics["eval/rpe_rot_deg_zero_motion"] = rotation_error_deg(gt_rel, np.broadcast_to(np.eye(4), gt_rel.shape))
        if m.vibration is not None:
            perm = torch.randperm(te.imu.shape[0] * te.imu.shape[1], generator=torch.Generator().manual_seed(0))
            shuffled = self.predict_relative(te, perm)
            metrics["eval/ate_imu_shuffled"] = float(np.mean(self._snippet_ates(te, shuffled)))
            metrics["eval/rpe_rot_deg_imu_shuffled"] = rotation_error_deg(gt_rel, shuffled)
            metrics["eval/fusion_gain"] = float(m.pose_net.fusion.proj.weight.norm())
            metrics["eval/imu_head_gain"] = float(m.pose_net.imu_head.weight.norm())
        metrics.update(self.baselines())
        if self.cfg.log_images:
            self._log_images(pred, te.depth[0, 1])
        return metrics

    def _heldout_loss(self, split) -> float:
        """The training loss on the first test sequence. Its auto-mask noise comes from a fixed generator, not
        the training one, so evaluating neither shifts the training batches nor varies between evaluations."""
        self.model.eval()
        t = torch.arange(1, split.num_frames - 1)
        frames = torch.stack([split.frames[0, t - 1], split.frames[0, t], split.frames[0, t + 1]], 1)
        imu = torch.stack([split.imu[0, t - 1], split.imu[0, t]], 1)
        return float(self.losses(frames.to(self.run.device), imu.to(self.run.device),
                                 torch.Generator().manual_seed(0))["loss"])

    def _log_images(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        te, writer = self.data.test, self.run.logger.writer
        step = self._eval_step  # the training step of this evaluation (0 before training)
        writer.add_image("depth/pred", colorize(pred[1]), step)
        writer.add_image("depth/gt", colorize(gt), step)
        frames = te.frames[0, :3].to(self.run.device)
        t = self.model.pose(frames[1:2], frames[2:3], te.imu[0, 1:2].to(self.run.device))
        warped, _ = geo.inverse_warp(frames[2:3], pred[1:2].to(self.run.device), t, self.k[None], self.inv_k[None])
        writer.add_image("warp/target_warped-next_next", torch.cat([frames[1], warped[0], frames[2]], -1).cpu()
                         .clamp(0, 1), step)

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transforms' values at a logged step, not window-averaged."""
        return self.step.log_metrics(step)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (+ the grad transform's state) and the batch/auto-mask generator: all a bit-identical
        resume needs (the LR is a function of the step)."""
        return {"model": self.model.state_dict(), **self.step.state_dict(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before the generator was saved still load (they resume on other batches). The
        StepLR state (``scheduler``) of checkpoints written before the shared step is ignored: the LR is now a
        function of the step, so it resumes at the right LR anyway."""
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state)
        if "generator" in state:
            self.gen.set_state(state["generator"])


def refuse_batch_mixing(model: torch.nn.Module) -> None:
    """A private transform clips each sample's gradient; a training-mode BatchNorm normalises with the batch's
    statistics, so one sample's loss depends on every other sample and no per-sample gradient exists."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"grad_transform: model layer '{name}' is a {type(module).__name__}: it mixes the "
                              f"samples of a batch (batch statistics), so per-sample gradients and DP are not "
                              f"defined for this model; drop the private transform (flashdp / dp_flat)")
