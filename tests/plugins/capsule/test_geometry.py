"""Geometry and loss checks of the capsule plugin against closed forms and the synthetic tube's ground truth."""
from __future__ import annotations

import math

import pytest
import torch

from plait.plugins.capsule import geometry as geo
from plait.plugins.capsule.losses import min_reprojection, photometric_error, smoothness, ssim_loss
from plait.plugins.capsule.tube import K_NORM, generate_split


def _k(b: int, h: int, w: int) -> torch.Tensor:
    return geo.scale_intrinsics(torch.tensor(K_NORM, dtype=torch.float64), h, w).expand(b, 4, 4)


def test_identity_pose_gives_identity_grid():
    b, h, w = 2, 12, 16
    depth = torch.rand(b, 1, h, w, dtype=torch.float64) * 5 + 0.1  # any depth
    k = _k(b, h, w)
    eye = torch.eye(4, dtype=torch.float64).expand(b, 4, 4)
    _, grid = geo.inverse_warp(torch.rand(b, 3, h, w, dtype=torch.float64), depth, eye, k)
    assert (grid - geo.identity_grid(b, h, w, torch.float64)).abs().max() < 1e-4
    # and sampling with it returns the image itself (align_corners=True convention)
    img = torch.rand(b, 3, h, w, dtype=torch.float64)
    warped, _ = geo.inverse_warp(img, depth, eye, k)
    assert torch.allclose(warped, img, atol=1e-4)  # the 1e-7 in the z division shifts by < 1e-5 px


def test_backproject_project_round_trip_matches_explicit_pinhole():
    torch.manual_seed(0)
    b, h, w = 3, 8, 10
    depth = torch.rand(b, 1, h, w, dtype=torch.float64) * 3 + 0.5
    k = _k(b, h, w)
    aa = torch.randn(b, 3, dtype=torch.float64) * 0.05
    tr = torch.randn(b, 3, dtype=torch.float64) * 0.05
    t = geo.transformation_from_parameters(aa, tr)
    pts = geo.backproject(depth, torch.linalg.inv(k))
    # independent oracle: per-pixel loop with the pinhole formula
    kk = k[0, :3, :3]
    for bi in range(b):
        for (v, u) in [(0, 0), (3, 7), (h - 1, w - 1)]:
            z = depth[bi, 0, v, u]
            x = torch.stack([(u - kk[0, 2]) / kk[0, 0] * z, (v - kk[1, 2]) / kk[1, 1] * z, z])
            assert torch.allclose(pts[bi, :3, v * w + u], x)
            xs = t[bi, :3, :3] @ x + t[bi, :3, 3]
            us, vs = kk[0, 0] * xs[0] / xs[2] + kk[0, 2], kk[1, 1] * xs[1] / xs[2] + kk[1, 2]
            grid = geo.project(pts, k, t, h, w)
            assert torch.allclose(grid[bi, v, u], torch.stack([us / (w - 1) * 2 - 1, vs / (h - 1) * 2 - 1]))
    # round trip: identity pose projects every backprojected point back onto its own pixel
    grid0 = geo.project(pts, k, torch.eye(4, dtype=torch.float64).expand(b, 4, 4), h, w)
    assert torch.allclose(grid0, geo.identity_grid(b, h, w, torch.float64), atol=1e-9)


def test_rodrigues_closed_form_and_inverse():
    torch.manual_seed(1)
    aa = torch.randn(5, 3, dtype=torch.float64)
    r = geo.rodrigues(aa)
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(geo.rodrigues(aa) @ geo.rodrigues(-aa), torch.eye(3, dtype=torch.float64).expand(5, 3, 3),
                          atol=1e-12)
    # rotation about z by θ: the textbook matrix
    th = 0.7
    rz = geo.rodrigues(torch.tensor([[0.0, 0.0, th]], dtype=torch.float64))[0]
    ref = torch.tensor([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]],
                       dtype=torch.float64)
    assert torch.allclose(rz, ref, atol=1e-12)
    assert torch.equal(geo.rodrigues(torch.zeros(1, 3)), torch.eye(3)[None])
    tr = torch.randn(5, 3, dtype=torch.float64)
    m, mi = geo.transformation_from_parameters(aa, tr), geo.transformation_from_parameters(aa, tr, invert=True)
    assert torch.allclose(m @ mi, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-12)


@pytest.fixture(scope="module")
def still_tube():
    return generate_split(num_sequences=1, num_frames=6, height=64, width=80, vibration="none", seed=3,
                          blur_subframes=1)


def test_gt_depth_and_pose_warp_lowers_photometric_error_3x(still_tube):
    s = still_tube
    h, w = s.frames.shape[-2:]
    k = geo.scale_intrinsics(torch.tensor(K_NORM, dtype=torch.float32), h, w)[None]
    # pairs where the capsule moves (≥ 0.04 cm): in a peristaltic rest phase no warp is already nearly exact
    pairs = [(i, j) for i in range(1, 5) for j in (i - 1, i + 1) if s.relative_pose(0, i, j)[:3, 3].norm() >= 0.04]
    assert len(pairs) >= 4
    ratios = []
    for tgt, src in pairs:
        target, source = s.frames[0, tgt][None], s.frames[0, src][None]
        t = s.relative_pose(0, tgt, src).float()[None]
        warped, grid = geo.inverse_warp(source, s.depth[0, tgt][None], t, k)
        # co-visible pixels: hit the wall in the target, land inside the source image, on its wall (not lumen)
        src_valid = torch.nn.functional.grid_sample(s.valid[0, src][None].float(), grid, align_corners=True)
        m = s.valid[0, tgt][None].float() * (grid.abs() <= 1).all(-1)[:, None] * (src_valid > 0.999)
        err_warp = ((warped - target).abs().mean(1, keepdim=True) * m).sum() / m.sum()
        err_none = ((source - target).abs().mean(1, keepdim=True) * m).sum() / m.sum()
        ratios.append(float(err_none / err_warp))
    assert min(ratios) >= 3.0, ratios
    # a wrong pose convention (the inverse transform) does not enjoy the same gain
    t_wrong = s.relative_pose(0, 3, 2).float()[None]
    warped, _ = geo.inverse_warp(s.frames[0, 3][None], s.depth[0, 2][None], t_wrong, k)
    m = s.valid[0, 2][None].float()
    err_wrong = ((warped - s.frames[0, 2][None]).abs().mean(1, keepdim=True) * m).sum() / m.sum()
    err_none = ((s.frames[0, 3] - s.frames[0, 2]).abs().mean(0) * m[0, 0]).sum() / m.sum()
    assert err_wrong > err_none / 3


def test_ssim_loss_zero_on_identical_images_and_positive_otherwise():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 10, 12)
    assert ssim_loss(x, x).abs().max() < 1e-6
    assert photometric_error(x, x).abs().max() < 1e-6
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim_loss(x, y).mean() > 0.05
    # matches a direct per-window computation at an interior pixel
    xi, yi = x[0, 0, 3:6, 4:7], y[0, 0, 3:6, 4:7]
    mx, my = xi.mean(), yi.mean()
    sx, sy, sxy = (xi * xi).mean() - mx**2, (yi * yi).mean() - my**2, (xi * yi).mean() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (1 - (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2))) / 2
    assert torch.allclose(ssim_loss(x, y)[0, 0, 4, 5], ref.clamp(0, 1), atol=1e-5)


def test_disp_to_depth_bounds():
    disp = torch.cat([torch.zeros(1), torch.rand(1000), torch.ones(1)])
    _, depth = geo.disp_to_depth(disp, 0.1, 100.0)
    assert depth.min() >= 0.1 * (1 - 1e-6) and depth.max() <= 100.0 * (1 + 1e-6)
    assert depth[0] == pytest.approx(100.0, rel=1e-6) and depth[-1] == pytest.approx(0.1, rel=1e-6)
    d_sorted = geo.disp_to_depth(torch.linspace(0, 1, 50), 0.1, 100.0)[1]
    assert torch.all(d_sorted[1:] < d_sorted[:-1])


def test_automask_selects_identity_on_static_frames():
    torch.manual_seed(3)
    target = torch.rand(2, 3, 16, 20)
    static = [target.clone(), target.clone()]  # the camera did not move: sources equal the target
    warped = [(target + 0.05 * torch.randn_like(target)).clamp(0, 1) for _ in range(2)]  # any imperfect warp
    rep = [photometric_error(w, target) for w in warped]
    ident = [photometric_error(s, target) for s in static]
    loss, mask = min_reprojection(rep, ident, generator=torch.Generator().manual_seed(0))
    assert mask.sum() == 0  # identity wins everywhere
    assert loss.max() < 1e-4
    # on a moving pair where the warp is exact, the warp wins
    moved = [torch.roll(target, 3, dims=-1)] * 2
    loss, mask = min_reprojection([photometric_error(target, target)] * 2,
                                  [photometric_error(m, target) for m in moved])
    assert mask.mean() > 0.95
    # without auto-masking it is the plain per-pixel minimum
    a, b = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    loss, _ = min_reprojection([a, b])
    assert torch.equal(loss, torch.minimum(a, b))


def test_smoothness_edge_aware():
    disp = torch.rand(1, 1, 8, 8) + 0.5
    flat = torch.full((1, 3, 8, 8), 0.5)
    edgy = torch.rand(1, 3, 8, 8) * 4
    assert smoothness(torch.ones(1, 1, 8, 8), flat) == 0
    assert smoothness(disp, edgy) < smoothness(disp, flat)  # image edges discount disparity gradients
    d = disp / disp.mean()
    ref = (d[..., :, :-1] - d[..., :, 1:]).abs().mean() + (d[..., :-1, :] - d[..., 1:, :]).abs().mean()
    assert torch.allclose(smoothness(disp, flat), ref, atol=1e-6)
