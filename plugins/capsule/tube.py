"""Synthetic capsule-in-a-tube sequences with known depth, pose, collision vibrations and a simulated IMU.

World: a tube along +z (world y points down, gravity +y) of radius r(z) = R0·(1 + a·sin(2πz/λ)) (folds).
The capsule moves forward with a peristaltic (stop-and-go) speed profile, drifts laterally and turns smoothly;
collisions arrive as a Poisson process, each adding a damped sinusoid A·e^{−t/τ}·sin(2πft) to position and
orientation. Frames are rendered by exact ray–tube intersection (march to the first wall crossing, then
bisection) with a world-anchored texture (mucosa + vessels), so brightness constancy holds under the
default ``flat`` lighting; rays beyond ``far`` see a dark lumen and have invalid depth.

Vibration corrupts the images the way a real capsule's do: each frame averages ``blur_subframes`` renders over
the exposure (motion blur grows with the vibration velocity) and adds Gaussian noise whose σ grows with the
vibration energy. The IMU (body = camera frame) samples at ``imu_rate``: gyro = body angular velocity,
accelerometer = Rᵀ(p̈ − g); both with bias and white noise. The IMU window of the frame pair (i, i+1) holds the
``imu_rate/fps`` samples in [t_i, t_{i+1}), shape (6, T) = [acc xyz, gyro xyz].

All randomness comes from one ``numpy.random.Generator`` seeded per sequence, so a split is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# normalised pinhole intrinsics: square pixels at 4:5 aspect (64×80 → fx = fy = 64 px)
K_NORM = np.array([[0.8, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
GRAVITY = np.array([0.0, 981.0, 0.0])  # world units are cm (tube radius ~1 cm)

VIBRATION_LEVELS = {  # collisions/s, ringing position (cm), ringing rotation (rad), noise σ gain, jolt (cm)
    "none": (0.0, 0.0, 0.0, 0.0, 0.0),
    "low": (1.0, 0.02, 0.01, 0.02, 0.03),
    "high": (4.0, 0.06, 0.05, 0.10, 0.08),
}

@dataclass
class TubeSplit:
    """Sequences of one split: frames (S, N, 3, H, W) in [0, 1], depth (S, N, 1, H, W), valid depth mask,
    camera-to-world poses (S, N, 4, 4), IMU windows (S, N−1, 6, T), vibration intensity (S, N)."""

    frames: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    c2w: torch.Tensor
    imu: torch.Tensor
    intensity: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.frames.shape[0]

    @property
    def num_frames(self) -> int:
        return self.frames.shape[1]

    def relative_pose(self, s: int, target: int, source: int) -> torch.Tensor:
        """T_{source<-target} (4, 4): maps target-camera points into the source camera."""
        return torch.linalg.inv(self.c2w[s, source]) @ self.c2w[s, target]


@dataclass
class TubeData:
    """A ``capsule_tube`` dataset: train/test splits, normalised intrinsics (3, 3) and rates."""

    train: TubeSplit
    test: TubeSplit
    k_norm: torch.Tensor
    fps: float
    imu_rate: float
    min_depth: float
    max_depth: float
    name: str = "capsule_tube"

    @property
    def imu_window(self) -> int:
        return self.train.imu.shape[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.frames.shape[-2:])


def _rot(axisangle: np.ndarray) -> np.ndarray:
    """Rodrigues for arrays (..., 3) → (..., 3, 3)."""
    theta = np.linalg.norm(axisangle, axis=-1, keepdims=True)
    axis = axisangle / np.maximum(theta, 1e-12)
    x, y, z = np.moveaxis(axis, -1, 0)
    zero = np.zeros_like(x)
    k = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis.shape[:-1], 3, 3)
    s, c = np.sin(theta)[..., None], np.cos(theta)[..., None]
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def _log_rot(r: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) → axis-angle (..., 3) (angles well below π)."""
    cos = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    theta = np.arccos(cos)[..., None]
    v = np.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1) / 2
    scale = np.where(theta > 1e-8, theta / np.maximum(np.sin(theta), 1e-12), 1.0)
    return v * scale


BURST_RATE = 1.5  # propulsive peristaltic bursts per second
RETROGRADE = 0.2  # fraction of bursts that push the capsule backwards (to-and-fro motion)


def _ramp(u: np.ndarray) -> np.ndarray:
    """Integral over [0, u] of the raised-cosine pulse (1 − cos 2πs)/2 on [0, 1]: 0 before, 1/2 after."""
    u = np.clip(u, 0.0, 1.0)
    return u / 2 - np.sin(2 * np.pi * u) / (4 * np.pi)


def _smoothstep(u: np.ndarray) -> np.ndarray:
    """(1 − cos πu)/2 on [0, 1]; 0 before, 1 after (C¹, so the IMU's second difference stays bounded)."""
    return (1 - np.cos(np.pi * np.clip(u, 0.0, 1.0))) / 2


class _Trajectory:
    """Continuous-time capsule pose: bursty peristalsis, slow drift and turning, and collisions.

    Forward motion is a slow base drift plus *propulsive bursts* arriving as a Poisson process (rate
    ``BURST_RATE``): each burst is a raised-cosine velocity pulse lasting 0.25–0.7 s, a fifth of them
    retrograde and weaker. A real capsule does not glide: it rests, is pushed by a contraction, stops, sometimes
    slips back — so speed changes *within* a 0.4 s ATE snippet, which a constant-velocity model cannot follow.
    Each collision (Poisson, rate per vibration level) adds a *jolt* — a quick (40 ms) step displacement, mostly
    lateral, and a small rotation step, both recoiling over ~0.5 s as the elastic wall pushes back — and the
    8–30 Hz damped *ringing* A·e^{−t/τ}·sin(2πft) on position and orientation.
    """

    def __init__(self, rng: np.random.Generator, duration: float, level: tuple[float, ...], speed: float,
                 radius: float):
        rate, self.a_pos, self.a_rot, _, self.a_jolt = level
        self.phase = rng.uniform(0, 2 * math.pi, size=8)
        self.lateral = 0.25 * radius
        # peristalsis: mean forward speed ≈ base + rate·E[A·D/2] = speed (before retrograde bursts)
        self.base = 0.2 * speed
        nb = rng.poisson(BURST_RATE * (duration + 2.0))
        self.b_t0 = rng.uniform(-1.5, duration, nb)
        self.b_dur = rng.uniform(0.25, 0.7, nb)
        sign = np.where(rng.random(nb) < RETROGRADE, -0.5, 1.0)
        self.b_amp = sign * rng.uniform(0.5, 1.5, nb) * 2 * (speed - self.base) / (BURST_RATE * 0.475)
        # collisions
        n = rng.poisson(rate * (duration + 1.0))
        self.t0 = np.sort(rng.uniform(-1.0, duration, n))
        self.freq = rng.uniform(8.0, 30.0, n)
        self.tau = rng.uniform(0.05, 0.2, n)
        self.dir_pos = rng.normal(size=(n, 3)) * np.array([1.0, 1.0, 0.5])
        self.dir_rot = rng.normal(size=(n, 3))
        self.amp = rng.uniform(0.5, 1.0, n)
        self.jolt_pos = rng.normal(size=(n, 3)) * np.array([1.0, 1.0, 0.3])
        self.jolt_rot = rng.normal(size=(n, 3)) * 0.5
        self.recoil = rng.uniform(0.3, 0.7, n)

    def _vib(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dt = t[:, None] - self.t0[None, :]
        on = dt > 0
        dt_on = np.where(on, dt, 0)
        env = np.where(on, np.exp(-dt_on / self.tau) * np.sin(2 * np.pi * self.freq * dt), 0.0) * self.amp
        energy = np.where(on, np.exp(-2 * dt_on / self.tau), 0.0) @ (self.amp ** 2)
        jolt = _smoothstep(dt / 0.04) * np.exp(-dt_on / self.recoil) * self.a_jolt
        pos = self.a_pos * env @ self.dir_pos + jolt @ self.jolt_pos
        rot = self.a_rot * env @ self.dir_rot + (self.a_rot / max(self.a_pos, 1e-9)) * jolt @ self.jolt_rot
        return pos, rot, energy

    def __call__(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Times (n,) → positions (n, 3), rotations camera→world (n, 3, 3), vibration energy (n,)."""
        p = self.phase
        u = (t[:, None] - self.b_t0[None, :]) / self.b_dur
        z = self.base * t + (_ramp(u) * self.b_dur * self.b_amp).sum(1)
        x = self.lateral * np.sin(0.9 * t + p[1])
        y = self.lateral * np.sin(0.7 * t + p[2])
        yaw = 0.12 * np.sin(0.8 * t + p[3])
        pitch = 0.10 * np.sin(0.6 * t + p[4])
        roll = 0.3 * np.sin(0.3 * t + p[5])
        vp, vr, energy = self._vib(t)
        pos = np.stack([x, y, z], -1) + vp
        smooth = _rot(np.stack([pitch, yaw, roll], -1))
        return pos, smooth @ _rot(vr), energy


def _texture(theta: np.ndarray, z: np.ndarray, footprint: np.ndarray, radius: float, coeffs: dict) -> np.ndarray:
    """World-anchored mucosa colour (…, 3) at tube angle θ and axial position z.

    Each pattern is prefiltered analytically (like a mip-map): its contrast is scaled by the Gaussian
    response exp(−(ω·σ)²/2) to its surface frequency ω, with σ half the pixel ``footprint`` on the wall. Without
    it, the grazing far wall aliases and bilinear warping cannot reproduce one frame from another.
    """
    sigma2 = (0.5 * footprint) ** 2
    shade = np.zeros_like(z)
    for k, wz, ph, a in coeffs["waves"]:
        omega2 = (k / radius) ** 2 + wz**2
        shade += a * np.exp(-0.5 * omega2 * sigma2) * np.sin(k * theta + wz * z + ph)
    base = np.array([0.85, 0.48, 0.45]) * (1.0 + 0.35 * shade)[..., None]
    vessel = np.zeros_like(z)
    for k, wz, ph in coeffs["vessels"]:
        omega2 = 9 * ((k / radius) ** 2 + wz**2)  # a thin line is mostly its third harmonic and above
        line = np.exp(-(np.sin(k * theta + wz * z + ph) / 0.35) ** 2)  # smooth profile: bilinear warps stay exact
        vessel = np.maximum(vessel, line * np.exp(-0.5 * omega2 * sigma2))
    return base * (1 - 0.5 * vessel[..., None]) + np.array([0.45, 0.05, 0.08]) * 0.5 * vessel[..., None]


def _render(pos: np.ndarray, rot: np.ndarray, rays_cam: np.ndarray, focal: float, radius: float, fold: float,
            wavelength: float, far: float, coeffs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view: (H·W, 3) colour, depth (H·W,) camera z, valid (H·W,) hit before ``far``."""
    d = rays_cam @ rot.T  # world directions; camera z component of rays_cam is 1 so ray parameter = depth

    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]

    def g(t: np.ndarray) -> np.ndarray:  # > 0 outside the wall
        x, y, z = pos[0] + t * dx, pos[1] + t * dy, pos[2] + t * dz
        return np.sqrt(x * x + y * y) - radius * (1 + fold * np.sin((2 * np.pi / wavelength) * z))

    def exit_cylinder(r: float) -> np.ndarray:  # ray parameter where |xy| reaches r (camera inside)
        a = np.maximum(dx * dx + dy * dy, 1e-12)
        b = 2 * (pos[0] * dx + pos[1] * dy)
        c = pos[0] ** 2 + pos[1] ** 2 - r * r
        return np.minimum((-b + np.sqrt(np.maximum(b * b - 4 * a * c, 0))) / (2 * a), far * 1.5)

    # the wall lies between the cylinders of radius R(1 − fold) and R(1 + fold): march that bracket to the
    # first outside sample, then bisect
    t_in, t_out = exit_cylinder(radius * (1 - fold)), exit_cylinder(radius * (1 + fold))
    lo, hi = t_in, t_out
    found = np.zeros(len(d), dtype=bool)
    prev = t_in
    for f in np.linspace(0, 1, 9)[1:]:
        cur = t_in + f * (t_out - t_in)
        new = ~found & (g(cur) > 0)
        lo, hi = np.where(new, prev, lo), np.where(new, cur, hi)
        found |= new
        prev = cur
    for _ in range(10):
        mid = (lo + hi) / 2
        out = g(mid) > 0
        hi, lo = np.where(out, mid, hi), np.where(out, lo, mid)
    t = (lo + hi) / 2
    valid = t < far
    p = pos + t[:, None] * d
    rho = np.maximum(np.hypot(p[:, 0], p[:, 1]), 1e-9)
    norm_d = np.linalg.norm(d, axis=1)
    cos_inc = np.abs(p[:, 0] * dx + p[:, 1] * dy) / (rho * norm_d)
    footprint = t * norm_d / focal / np.maximum(cos_inc, 0.15)
    colour = _texture(np.arctan2(p[:, 1], p[:, 0]), p[:, 2], footprint, radius, coeffs)
    lumen = np.array([0.12, 0.04, 0.04])
    colour = np.where(valid[:, None], colour, lumen)
    return colour, np.minimum(t, far), valid


def generate_split(*, num_sequences: int, num_frames: int, height: int, width: int, vibration: str, seed: int,
                   fps: float = 10.0, imu_rate: float = 100.0, speed: float = 1.5, radius: float = 1.0,
                   fold: float = 0.12, wavelength: float = 1.5, far: float = 8.0, blur_subframes: int = 3,
                   noise: float = 0.005, imu_noise: float = 0.02) -> TubeSplit:
    """Render ``num_sequences`` sequences of ``num_frames`` frames at one vibration level."""
    if vibration not in VIBRATION_LEVELS:
        raise ValueError(f"vibration {vibration!r} is not a level; allowed: {', '.join(VIBRATION_LEVELS)}")
    ratio = imu_rate / fps
    if abs(ratio - round(ratio)) > 1e-9 or ratio < 1:
        raise ValueError(f"imu_rate ({imu_rate}) must be a whole multiple of fps ({fps})")
    level = VIBRATION_LEVELS[vibration]
    win = int(round(ratio))
    k = K_NORM * np.array([[width], [height], [1.0]])
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rays = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], -1) @ np.linalg.inv(k).T
    out = {k_: [] for k_ in ("frames", "depth", "valid", "c2w", "imu", "intensity")}
    for s in range(num_sequences):
        rng = np.random.default_rng([seed, s])
        duration = num_frames / fps
        traj = _Trajectory(rng, duration, level, speed, radius)
        coeffs = {"waves": [(int(rng.integers(2, 9)), rng.uniform(1, 5), rng.uniform(0, 6.3), rng.uniform(0.3, 0.6))
                            for _ in range(6)],
                  "vessels": [(int(rng.integers(1, 3)), rng.uniform(1.0, 2.5), rng.uniform(0, 6.3)) for _ in range(3)]}
        t_frames = np.arange(num_frames) / fps
        pos, rot, energy = traj(t_frames)
        exposure = 0.5 / fps
        frames, depth, valid = [], [], []
        for i, t in enumerate(t_frames):
            subs = t + exposure * (np.linspace(-0.5, 0.5, blur_subframes) if blur_subframes > 1 else np.zeros(1))
            sp, sr, _ = traj(subs)
            colour = np.mean([_render(sp[j], sr[j], rays, k[0, 0], radius, fold, wavelength, far, coeffs)[0]
                              for j in range(len(subs))], 0)
            _, dep, val = _render(pos[i], rot[i], rays, k[0, 0], radius, fold, wavelength, far, coeffs)
            sigma = noise + level[3] * math.sqrt(energy[i])
            colour = np.clip(colour + rng.normal(0, sigma, colour.shape), 0, 1)
            frames.append(colour.reshape(height, width, 3).transpose(2, 0, 1))
            depth.append(dep.reshape(1, height, width))
            valid.append(val.reshape(1, height, width))
        c2w = np.tile(np.eye(4), (num_frames, 1, 1))
        c2w[:, :3, :3], c2w[:, :3, 3] = rot, pos
        # IMU by central differences on a fine grid, then decimated to imu_rate
        h = 1.0 / (imu_rate * 4)
        t_imu = np.arange((num_frames - 1) * win) / imu_rate
        p_m, r_m, _ = traj(t_imu - h)
        p_0, r_0, _ = traj(t_imu)
        p_p, r_p, _ = traj(t_imu + h)
        acc_w = (p_p - 2 * p_0 + p_m) / h**2
        acc = np.einsum("nji,nj->ni", r_0, acc_w - GRAVITY)
        gyro = _log_rot(np.swapaxes(r_m, -1, -2) @ r_p) / (2 * h)
        bias = rng.normal(0, 0.01, 6) * np.array([100, 100, 100, 1, 1, 1])
        imu = np.concatenate([acc, gyro], -1) + bias
        imu = imu + rng.normal(0, imu_noise, imu.shape) * np.array([100, 100, 100, 1, 1, 1])
        out["imu"].append(imu.reshape(num_frames - 1, win, 6).transpose(0, 2, 1))
        out["frames"].append(np.stack(frames))
        out["depth"].append(np.stack(depth))
        out["valid"].append(np.stack(valid))
        out["c2w"].append(c2w)
        out["intensity"].append(energy)
    f32 = lambda x: torch.from_numpy(np.stack(x)).float()  # noqa: E731
    return TubeSplit(frames=f32(out["frames"]), depth=f32(out["depth"]),
                     valid=torch.from_numpy(np.stack(out["valid"])), c2w=torch.from_numpy(np.stack(out["c2w"])),
                     imu=f32(out["imu"]), intensity=f32(out["intensity"]))


def load_tube(*, height: int = 64, width: int = 80, vibration: str = "low", train_sequences: int = 4,
              test_sequences: int = 2, num_frames: int = 40, seed: int = 0, fps: float = 10.0,
              imu_rate: float = 100.0, fold: float = 0.12, blur_subframes: int = 3, far: float = 8.0) -> TubeData:
    """The ``capsule_tube`` dataset factory (train and test sequences at the same vibration level)."""
    if num_frames < 5:
        raise ValueError(f"num_frames must be >= 5 (5-frame ATE snippets), got {num_frames}")
    for key, n in (("train_sequences", train_sequences), ("test_sequences", test_sequences)):
        if n < 1:
            raise ValueError(f"{key} must be >= 1 (sequences rendered for that split), got {n}")
    common = dict(num_frames=num_frames, height=height, width=width, vibration=vibration, fps=fps,
                  imu_rate=imu_rate, fold=fold, blur_subframes=blur_subframes, far=far)
    train = generate_split(num_sequences=train_sequences, seed=seed, **common)
    test = generate_split(num_sequences=test_sequences, seed=seed + 10_000, **common)
    return TubeData(train=train, test=test, k_norm=torch.tensor(K_NORM, dtype=torch.float32), fps=fps,
                    imu_rate=imu_rate, min_depth=0.05, max_depth=far)
