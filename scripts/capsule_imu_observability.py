"""How much of the capsule's frame-to-frame *translation* an IMU can tell, on the synthetic high-vibration tube.

The V2-SfMLearner check "V2 beats vision-only ATE on the high-vibration split" needs the IMU to carry translation
(ATE is translation-only). This script measures, without any network, what the best hand-written strapdown
estimators recover from the IMU, and what ATE that would buy if a model got everything else right. It uses the
simulator's continuous trajectory (``plugins/capsule/tube.py``), so no frames are rendered (seconds on a CPU).

Target: the *vibration translation* of each frame pair (a, b), expressed in camera a — the ground-truth relative
translation minus that of the same trajectory with the vibration switched off (collision jolts and ringing are
all a vision-only model misses; see docs/capsule.md). Estimators, each a double integration of the specific
force rotated into camera a by the integrated gyro, over the pair's interval plus ``history`` seconds before it
(the velocity at t_a is an unknown integration constant; it is taken as the mean over the history):

* ``ideal_velocity``: knows the true world velocity every 10 ms (a perfect, gravity-free Δv integration): the
  ceiling of any accelerometer-based estimate with this integration constant.
* ``delta_imu_exact``: an ideal strapdown IMU — exact Δv/Δt (in the body frame at each 10 ms interval start, as
  sculling-compensated IMUs deliver) and exact Δθ — without noise or bias; gravity removed as the mean over the
  window (its direction in camera a is unknown).
* ``delta_imu_long_gravity``: the same IMU with the tube's bias and noise; gravity from a 3 s window with a linear
  detrend (absorbs the gyro bias's first-order drift).
* ``tube_imu``: the accelerometer and gyro as the tube simulates them (point samples at 100 Hz, bias, noise),
  same estimator as the previous row.

For each: per-axis R² of gain·estimate against the target (the least-squares gain, which a learned linear map
would find at best), and the 5-frame snippet ATE of "ground-truth rotation + the vibration-free translation +
gain·estimate" against the same without the estimate (``ate_no_vibration``: the floor a perfect vision-only
model that ignores vibration reaches) and with the true vibration (0: exact). Prints one JSON object.

    python scripts/capsule_imu_observability.py [--sequences 12] [--seed 10000]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

from plait.plugins.capsule.metrics import ate
from plait.plugins.capsule.tube import GRAVITY, VIBRATION_LEVELS, _log_rot, _rot, _Trajectory

FPS, RATE, DT = 10.0, 100.0, 0.01
WIN = int(RATE / FPS)
SNIPPET = 5


def _velocity(traj, t: np.ndarray, h: float = 1e-6) -> np.ndarray:
    return (traj(t + h)[0] - traj(t - h)[0]) / (2 * h)


def delta_imu(traj, t0: float, n: int, fine: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Exact integrated IMU outputs over n intervals of 10 ms from t0: Δv/Δt in the body frame at each interval's
    start (specific force, gravity included) and Δθ/Δt = log(R_startᵀ R_end)/Δt."""
    t = t0 + np.arange(n * fine + 1) * (DT / fine)
    v = _velocity(traj, t)
    _, rot, _ = traj(t)
    start = rot[::fine]
    dv_world = (v[1:] - v[:-1]) - GRAVITY * (DT / fine)
    dv = np.einsum("nji,nj->ni", start[np.arange(n * fine) // fine], dv_world)
    return dv.reshape(n, fine, 3).sum(1) / DT, _log_rot(np.swapaxes(start[:-1], -1, -2) @ start[1:]) / DT


def point_imu(traj, t0: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The tube's own IMU model (``generate_split``): point samples of Rᵀ(p̈ − g) and the body rate."""
    t = t0 + np.arange(n) * DT
    h = 1.0 / (RATE * 4)
    (p_m, r_m, _), (p_0, r_0, _), (p_p, r_p, _) = traj(t - h), traj(t), traj(t + h)
    acc = np.einsum("nji,nj->ni", r_0, (p_p - 2 * p_0 + p_m) / h**2 - GRAVITY)
    return acc, _log_rot(np.swapaxes(r_m, -1, -2) @ r_p) / (2 * h)


def _detrend(x: np.ndarray, degree: int) -> np.ndarray:
    if degree < 0:
        return x
    tt = (np.arange(len(x))[:, None] - len(x) / 2) / len(x)
    basis = np.concatenate([tt**k for k in range(degree + 1)], 1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return x - basis @ coef


def strapdown(f: np.ndarray, w: np.ndarray, anchor: int, history: int, detrend: int) -> np.ndarray:
    """Displacement over the last WIN samples, in the body frame at sample ``anchor`` (= t_a), from specific force
    f and body rate w (n, 3) covering [t_a − anchor·DT, t_b). Gravity (and accelerometer bias) = the fitted
    polynomial of degree ``detrend`` of the rotated specific force over the whole window; the velocity constant
    makes the mean velocity over the ``history`` samples before t_a zero."""
    n = len(f)
    rel = [np.eye(3)] * (n + 1)
    for j in range(anchor, n):
        rel[j + 1] = rel[j] @ _rot(w[j] * DT)
    for j in range(anchor, 0, -1):
        rel[j - 1] = rel[j] @ _rot(-w[j - 1] * DT)
    acc = _detrend(np.stack([rel[j] @ f[j] for j in range(n)]), detrend)[anchor - history:]
    vel = np.concatenate([np.zeros((1, 3)), np.cumsum(acc, 0) * DT])
    vel = vel - vel[:history + 1].mean(0)
    seg = vel[history:]
    return (seg[1:] + seg[:-1]).sum(0) / 2 * DT


ESTIMATORS = {  # name: (sensor, gravity window s, velocity history s, detrend degree, bias+noise)
    "ideal_velocity": ("velocity", 0.5, 0.5, -1, False),
    "delta_imu_exact": ("delta", 0.5, 0.5, 0, False),
    "delta_imu_long_gravity": ("delta", 3.0, 0.3, 1, True),
    "tube_imu": ("point", 3.0, 0.3, 1, True),
}


def sequence(s: int, seed: int, frames: int) -> dict:
    """Ground truth and every estimate for one high-vibration sequence (the tube's test-split seeding)."""
    rng = np.random.default_rng([seed, s])
    traj = _Trajectory(rng, frames / FPS, VIBRATION_LEVELS["high"], 1.5, 1.0)
    calm = copy.copy(traj)
    calm.a_pos = calm.a_rot = calm.a_jolt = 0.0
    t_frames = np.arange(frames) / FPS
    pos, rot, _ = traj(t_frames)
    pos_c, rot_c, _ = calm(t_frames)
    true = np.stack([rot[i].T @ (pos[i + 1] - pos[i]) for i in range(frames - 1)])
    smooth = np.stack([rot_c[i].T @ (pos_c[i + 1] - pos_c[i]) for i in range(frames - 1)])
    out = {"rot": rot, "true": true, "smooth": smooth}
    noise_rng = np.random.default_rng([seed, s, 1])
    for name, (sensor, grav_s, hist_s, degree, noisy) in ESTIMATORS.items():
        g, h = int(round(grav_s * RATE)), int(round(hist_s * RATE))
        n = g + (frames - 1) * WIN
        if sensor == "velocity":
            t = -grav_s + np.arange(n + 1) * DT
            f = (np.diff(_velocity(traj, t), axis=0) / DT) @ np.eye(3)  # world acceleration (no gravity)
            w = np.zeros((n, 3))
        elif sensor == "delta":
            f, w = delta_imu(traj, -grav_s, n)
        else:
            f, w = point_imu(traj, -grav_s, n)
        if noisy:  # the tube's IMU errors: per-sequence bias and white noise (cm/s², rad/s)
            f = f + noise_rng.normal(0, 1.0, 3) + noise_rng.normal(0, 2.0, f.shape)
            w = w + noise_rng.normal(0, 0.01, 3) + noise_rng.normal(0, 0.02, w.shape)
        est = []
        for i in range(frames - 1):
            a0 = g + i * WIN
            d = strapdown(f[a0 - g:a0 + WIN], w[a0 - g:a0 + WIN], g, h, degree)
            est.append(rot[i].T @ d if sensor == "velocity" else d)  # world → camera a for the ideal row
        out[name] = np.stack(est)
    return out


def snippet_ate(seqs: list[dict], translation) -> float:
    """Mean 5-frame ATE of trajectories chained from ground-truth rotations and ``translation(seq)`` (N−1, 3)."""
    errs = []
    for sq in seqs:
        rot, t_pred, t_true = sq["rot"], translation(sq), sq["true"]
        for i in range(len(t_true) - SNIPPET + 2):
            g, p = [np.zeros(3)], [np.zeros(3)]
            r0 = rot[i]
            for k in range(SNIPPET - 1):
                rk = r0.T @ rot[i + k]  # camera i+k in camera i
                g.append(g[-1] + rk @ t_true[i + k])
                p.append(p[-1] + rk @ t_pred[i + k])
            errs.append(ate(np.stack(g), np.stack(p)))
    return float(np.mean(errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=12)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=10_000, help="the tube's test-split seed for data.seed=0")
    args = ap.parse_args()
    start = time.perf_counter()
    seqs = [sequence(s, args.seed, args.frames) for s in range(args.sequences)]
    target = np.concatenate([sq["true"] - sq["smooth"] for sq in seqs])
    result = {"sequences": args.sequences, "pairs": len(target),
              "vibration_translation_std_cm": [round(float(x), 4) for x in target.std(0)],
              "ate_exact": snippet_ate(seqs, lambda sq: sq["true"]),
              "ate_no_vibration": snippet_ate(seqs, lambda sq: sq["smooth"]),
              "ate_forward_only": snippet_ate(seqs, lambda sq: sq["true"] * np.array([0.0, 0.0, 1.0])),
              "estimators": {}}
    for name in ESTIMATORS:
        est = np.concatenate([sq[name] for sq in seqs])
        gain = (est * target).sum(0) / np.maximum((est * est).sum(0), 1e-12)
        resid = target - gain * est
        r2 = 1 - (resid**2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
        result["estimators"][name] = {
            "r2_xyz": [round(float(x), 3) for x in r2], "gain_xyz": [round(float(x), 3) for x in gain],
            "ate": snippet_ate(seqs, lambda sq, n=name, g=gain: sq["smooth"] + g * sq[n])}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
