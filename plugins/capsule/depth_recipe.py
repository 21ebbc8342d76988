"""Recipe ``depth``: self-supervised depth + ego-motion training of ``v2_sfmlearner`` on frame triplets.

Per step: a batch of (t−1, t, t+1) triplets with the IMU windows of both pairs; the depth of frame t at every
scale (upsampled to full resolution), the poses T_{t−1<−t} (pair [t−1, t], inverted) and T_{t+1<−t} (pair
[t, t+1]); inverse warps of both sources; per-pixel minimum SSIM+L1 reprojection with auto-masking; edge-aware
smoothness weighted 1/2^scale; mean over scales; for V2 with ``gyro_weight`` > 0 also the auxiliary gyro loss
(predicted rotation vs the integrated gyro). Evaluation on the test split: median-scaled depth metrics against
the best constant depth, 5-frame ATE against zero-motion and constant-velocity baselines, the frame-to-frame
rotation error (RPE-rot, degrees) against zero motion, both with the IMU windows shuffled across snippets
(V2 only), and depth/warp images in TensorBoard.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.run import Run, train_loop

from . import geometry as geo
from .config import DepthRecipeConfig
from .losses import min_reprojection, photometric_error, smoothness
from .metrics import (ate, best_constant_abs_rel, chain_positions, colorize, median_scaled_metrics,
                      rotation_error_deg)


class DepthRecipe:
    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = DepthRecipeConfig(**options)
        if c.batch_size < 1 or c.lr <= 0 or c.eval_snippet < 2:
            raise ConfigError("recipe: batch_size must be >= 1, lr > 0 and eval_snippet >= 2")
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
        self.model = run.build("model", height=h, width=w, imu_window=data.imu_window, imu_rate=data.imu_rate,
                               min_depth=data.min_depth, max_depth=data.max_depth).to(run.device)
        if self.model.vibration is not None:
            self.model.vibration.set_statistics(data.train.imu.flatten(0, 1).to(run.device))
        self.k = geo.scale_intrinsics(data.k_norm, h, w).to(run.device)
        self.inv_k = torch.linalg.inv(self.k)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.StepLR(self.optimizer, c.lr_step, 0.1) if c.lr_step else None)
        s, n = data.train.num_sequences, data.train.num_frames
        self.index = [(i, t) for i in range(s) for t in range(1, n - 1)]
        self.gen = torch.Generator().manual_seed(run.cfg.run.seed)
        self._eval_step = 0

    def __call__(self) -> dict[str, Any]:
        return train_loop(self.run, self)

    # --- loss ------------------------------------------------------------------------------------------
    def losses(self, frames: torch.Tensor, imu: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """frames (B, 3, 3, H, W) = [t−1, t, t+1]; imu (B, 2, 6, T) for pairs (t−1, t) and (t, t+1);
        ``generator`` draws the auto-mask tie-breaking noise."""
        c, m = self.cfg, self.model
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
            sm = smoothness(disp, img_s)
            total = total + per_pixel.mean() + c.smoothness * sm / 2**s
            photo, smooth_total = photo + per_pixel.mean().detach(), smooth_total + sm.detach()
        n = len(scales)
        parts = {"loss": total / n, "photometric": photo / n, "smoothness": smooth_total / n,
                 "automask_used": mask.mean().detach()}
        if c.gyro_weight > 0 and m.vibration is not None:
            gyro = self.gyro_loss([p[0] for p in params], imu)
            parts["loss"] = parts["loss"] + c.gyro_weight * gyro
            parts["gyro"] = gyro.detach()
        return parts

    def gyro_loss(self, axisangles: list[torch.Tensor], imu: torch.Tensor) -> torch.Tensor:
        """Mean |ω̂ − (−Σω·dt)| (rad) over both pairs: the predicted rotation of T_{b<-a} = R_bᵀR_a against
        the integrated gyro, which measures R_aᵀR_b (hence the sign). Self-supervised: the gyro is a sensor
        input, not ground truth."""
        target = [-self.model.vibration.preintegrate(imu[:, i])[:, :3] for i in range(2)]
        return torch.stack([(a - t).abs().mean() for a, t in zip(axisangles, target)]).mean()

    # --- Task protocol ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        tr, dev = self.data.train, self.run.device
        idx = torch.randint(len(self.index), (self.cfg.batch_size,), generator=self.gen)
        seq = torch.tensor([self.index[i][0] for i in idx])
        t = torch.tensor([self.index[i][1] for i in idx])
        frames = torch.stack([tr.frames[seq, t - 1], tr.frames[seq, t], tr.frames[seq, t + 1]], 1).to(dev)
        imu = torch.stack([tr.imu[seq, t - 1], tr.imu[seq, t]], 1).to(dev)
        self.model.train()
        parts = self.losses(frames, imu, self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {f"train/{k}": float(v.detach()) for k, v in parts.items()} | {"train/lr": self.optimizer.param_groups[0]["lr"]}

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
        te, tr, L = self.data.test, self.data.train, self.cfg.eval_snippet
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
        step = self._eval_step
        self._eval_step += 1
        writer.add_image("depth/pred", colorize(pred[1]), step)
        writer.add_image("depth/gt", colorize(gt), step)
        frames = te.frames[0, :3].to(self.run.device)
        t = self.model.pose(frames[1:2], frames[2:3], te.imu[0, 1:2].to(self.run.device))
        warped, _ = geo.inverse_warp(frames[2:3], pred[1:2].to(self.run.device), t, self.k[None], self.inv_k[None])
        writer.add_image("warp/target|warped_next|next", torch.cat([frames[1], warped[0], frames[2]], -1).cpu()
                         .clamp(0, 1), step)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, the batch/auto-mask generator and the LR schedule: all a bit-identical resume needs."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.gen.get_state()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before the generator and scheduler were saved still load (they resume exactly
        only in the model and optimizer)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "generator" in state:
            self.gen.set_state(state["generator"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
