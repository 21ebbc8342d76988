"""Evaluation: median-scaled depth metrics, 5-frame ATE (Monodepth2's ``evaluate_pose`` definition), the
frame-to-frame rotation error (RPE-rot, degrees) and
classification metrics for imbalanced data, plus small image helpers for TensorBoard."""
from __future__ import annotations

import numpy as np
import torch

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")


def depth_errors(gt: torch.Tensor, pred: torch.Tensor) -> dict[str, float]:
    """Standard errors between valid ground-truth and predicted depths (1-D tensors)."""
    thresh = torch.maximum(gt / pred, pred / gt)
    return {"abs_rel": float(((gt - pred).abs() / gt).mean()), "sq_rel": float(((gt - pred) ** 2 / gt).mean()),
            "rmse": float(((gt - pred) ** 2).mean().sqrt()),
            "rmse_log": float(((gt.log() - pred.log()) ** 2).mean().sqrt()),
            "a1": float((thresh < 1.25).double().mean()), "a2": float((thresh < 1.25**2).double().mean()),
            "a3": float((thresh < 1.25**3).double().mean())}


def median_scaled_metrics(gt: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor, min_depth: float,
                          max_depth: float) -> dict[str, float]:
    """Per image: scale ``pred`` by median(gt)/median(pred) on valid pixels, clamp, then average the errors."""
    rows = []
    for g, p, m in zip(gt, pred, valid):
        g, p = g[m], p[m]
        p = (p * g.median() / p.median()).clamp(min_depth, max_depth)
        rows.append(depth_errors(g, p))
    return {k: float(np.mean([r[k] for r in rows])) for k in DEPTH_KEYS}


def best_constant_abs_rel(gt: torch.Tensor, valid: torch.Tensor) -> float:
    """AbsRel of the best per-image constant depth: the 1/g-weighted median of g minimises Σ|g − c|/g."""
    out = []
    for g, m in zip(gt, valid):
        g = g[m].double().sort().values
        w = 1 / g
        cdf = w.cumsum(0) / w.sum()
        c = g[int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=cdf.dtype)))]
        out.append(float(((g - c).abs() / g).mean()))
    return float(np.mean(out))


def ate(gt_xyz: np.ndarray, pred_xyz: np.ndarray) -> float:
    """Monodepth2's snippet ATE: align first frames, least-squares scale, sqrt(Σ‖s·p − g‖²) / N."""
    g = gt_xyz - gt_xyz[0]
    p = pred_xyz - pred_xyz[0]
    denom = float((p * p).sum())
    scale = float((g * p).sum()) / denom if denom > 0 else 0.0
    return float(np.sqrt(((scale * p - g) ** 2).sum()) / g.shape[0])


def rotation_error_deg(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean geodesic angle (degrees) between the rotation blocks of (…, 4, 4) relative poses: RPE-rot."""
    r = np.swapaxes(gt[..., :3, :3], -1, -2) @ pred[..., :3, :3]
    cos = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def chain_positions(rel: list[np.ndarray]) -> np.ndarray:
    """Camera positions of a snippet from relative poses T_{k+1<-k} (4×4): c2w_{k+1} = c2w_k · T⁻¹."""
    c2w = [np.eye(4)]
    for t in rel:
        c2w.append(c2w[-1] @ np.linalg.inv(t))
    return np.stack([m[:3, 3] for m in c2w])


def classification_metrics(y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present), macro-F1 (over classes present in y or
    pred) and the multi-class MCC (Gorodkin's R_K), from the confusion matrix."""
    cm = confusion_matrix(y, pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    used = present | (predicted > 0)
    n = cm.sum()
    c = tp.sum()
    cov = c * n - (support * predicted).sum()
    den = np.sqrt((n * n - (predicted**2).sum()) * (n * n - (support**2).sum()))
    return {"accuracy": float(c / n), "balanced_accuracy": float(recall[present].mean()),
            "macro_f1": float(f1[used].mean()), "mcc": float(cov / den) if den > 0 else 0.0}


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y), np.asarray(pred)), 1)
    return cm


def confusion_image(cm: np.ndarray, cell: int = 12) -> np.ndarray:
    """Row-normalised confusion matrix as an HWC uint8 image (white = 0, dark blue = 1), ``cell`` px per entry."""
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    r = np.kron(rows, np.ones((cell, cell)))
    img = np.stack([1 - 0.9 * r, 1 - 0.7 * r, 1 - 0.2 * r], -1)
    return (img * 255).astype(np.uint8)


def prediction_grid(x: torch.Tensor, y: np.ndarray, pred: np.ndarray, cols: int = 8, border: int = 2) -> torch.Tensor:
    """Input images (N, C, H, W) in a (3, H', W') grid, each framed green when predicted right, red when wrong."""
    n, c, h, w = x.shape
    img = x[:, :3] if c >= 3 else x[:, :1].expand(n, 3, h, w)
    lo, hi = img.amin((1, 2, 3), keepdim=True), img.amax((1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo + 1e-8)
    ok = torch.as_tensor(y == pred)
    frame = torch.zeros(n, 3, h + 2 * border, w + 2 * border)
    frame[:, 1] = ok[:, None, None].float()
    frame[:, 0] = (~ok)[:, None, None].float()
    frame[:, :, border:border + h, border:border + w] = img
    rows = -(-n // cols)
    grid = torch.ones(3, rows * frame.shape[2], cols * frame.shape[3])
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * frame.shape[2]:(r + 1) * frame.shape[2], q * frame.shape[3]:(q + 1) * frame.shape[3]] = frame[i]
    return grid


def colorize(depth: torch.Tensor) -> torch.Tensor:
    """(1, H, W) depth → (3, H, W) in [0, 1] (near = bright yellow, far = dark purple), for TensorBoard."""
    d = depth[0]
    x = 1 - (d - d.min()) / (d.max() - d.min() + 1e-8)
    return torch.stack([x.clamp(0, 1), (x**2).clamp(0, 1), (0.4 * (1 - x) + 0.1).clamp(0, 1)])
