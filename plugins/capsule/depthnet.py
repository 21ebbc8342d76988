"""V2-SfMLearner networks: depth net, pose net, vibration branch and Fourier fusion (from scratch, no weights).

* `ResNetEncoder`: conv7×7/2 → maxpool → stages of BasicBlocks (``blocks`` per stage, widths ``width·[1,1,2,4,8]``)
  returning every level (strides 2, 4, 8, …, 2^(1+len(blocks))). ``blocks=[2,2,2,2], width=64`` is ResNet-18.
* `DepthDecoder`: Monodepth2's decoder (reflect-padded 3×3 conv + ELU, nearest ×2, skip concat) with sigmoid
  disparity heads at up to 4 scales.
* `PoseNet`: separate encoder on the 6-channel frame pair → squeeze 1×1 → 3×3 → 3×3 → 1×1 (6), spatial mean,
  ×0.01 → (axis-angle, translation).
* `VibrationBranch`: MLSTM-FCN over the IMU window (B, 6, T) (LSTM last state ∥ FCN with squeeze-excitation,
  global average pool) → embedding v, and the window's pre-integration (gyro integral, mean specific force,
  displacement shape), standardised → z; z reaches the axis-angle through a zero-initialised linear map.
* `FourierFusion`: X = rfft2(F); amplitude gated per channel by 2σ(MLP(v)) and the DC coefficient shifted by
  MLP(v); F' = irfft2(X'); output F + conv1×1(F'). The 1×1 conv starts at 0, so an untrained V2 model *is* the
  vision-only model, bit for bit (the ablation the paper's "compatible with vision-only algorithms" implies).

The fusion acts on the pose-encoder bottleneck (vibration mostly corrupts ego-motion); depth is vision-only.

``norm``: ``batch`` (default, Monodepth2's BatchNorm in the encoders and the FCN) or ``group`` (GroupNorm, ≤ 8
groups, at the same places): per sample, so a private ``grad_transform:`` gets exact per-sample gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import disp_to_depth, transformation_from_parameters

IMU_CHANNELS = 6
PREINT_DIM = 9  # gyro integral (3), mean specific force (3), displacement shape (3)
NORMS = ("batch", "group")
GROUPS = 8  # GroupNorm groups (fewer when the width is not a multiple: the largest divisor <= 8)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"model.norm: {norm!r} is not supported; allowed: {', '.join(NORMS)}")


def norm_layer(norm: str, channels: int, dim: int = 2) -> nn.Module:
    """``batch``: BatchNorm (Monodepth2's choice; batch statistics, so samples are not independent); ``group``:
    GroupNorm (Wu & He 2018), per sample, so per-sample gradients and DP are exact."""
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels) if dim == 2 else nn.BatchNorm1d(channels)
    groups = max(g for g in range(1, GROUPS + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetEncoder(nn.Module):
    """ResNet-style encoder; ``forward`` returns all levels (first at stride 2)."""

    def __init__(self, in_channels: int = 3, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 norm: str = "batch"):
        super().__init__()
        self.channels = [width] + [width * 2**i for i in range(len(blocks))]
        self.stride = 2 ** (len(blocks) + 1)
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(norm, width)
        self.stages = nn.ModuleList()
        cin = width
        for i, n in enumerate(blocks):
            cout = self.channels[i + 1]
            layers = [BasicBlock(cin, cout, 1 if i == 0 else 2, norm)] + [BasicBlock(cout, cout, 1, norm)
                                                                          for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*layers))
            cin = cout

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [F.relu(self.bn1(self.conv1((x - 0.45) / 0.225)))]
        y = F.max_pool2d(feats[0], 3, 2, 1)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        return feats


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.conv(x))


class DepthDecoder(nn.Module):
    """Multi-scale sigmoid-disparity decoder; ``forward`` returns {scale: (B, 1, H/2^s, W/2^s)}."""

    def __init__(self, enc_channels: list[int], dec_channels: list[int], scales: int = 4):
        super().__init__()
        n = len(enc_channels)
        self.dec = list(dec_channels)[:n]
        self.scales = list(range(min(scales, n)))
        self.up0, self.up1 = nn.ModuleList(), nn.ModuleList()
        for i in range(n - 1, -1, -1):
            cin = enc_channels[-1] if i == n - 1 else self.dec[i + 1]
            self.up0.append(ConvBlock(cin, self.dec[i]))
            self.up1.append(ConvBlock(self.dec[i] + (enc_channels[i - 1] if i > 0 else 0), self.dec[i]))
        self.heads = nn.ModuleDict({str(s): nn.Conv2d(self.dec[s], 1, 3, padding=1, padding_mode="reflect")
                                    for s in self.scales})

    def forward(self, feats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        n, x, out = len(feats), feats[-1], {}
        for j, i in enumerate(range(n - 1, -1, -1)):
            x = F.interpolate(self.up0[j](x), scale_factor=2, mode="nearest")
            if i > 0:
                x = torch.cat([x, feats[i - 1]], 1)
            x = self.up1[j](x)
            if i in self.scales:
                out[i] = torch.sigmoid(self.heads[str(i)](x))
        return out


class VibrationBranch(nn.Module):
    """MLSTM-FCN over an IMU window (B, 6, T) → embedding v (B, dim), plus the window's pre-integration.

    Inputs are standardised with stored training statistics. `preintegrate` gives the physical summary a
    strapdown integrator would: the gyro integral (≈ the relative rotation), the mean specific force (gravity
    direction) and the acc double integral after removing the window mean (the vibration displacement shape).
    """

    def __init__(self, window: int, dim: int, hidden: int = 16, fcn: tuple[int, int, int] = (32, 64, 32),
                 imu_rate: float = 100.0, norm: str = "batch"):
        super().__init__()
        self.window, self.dt = window, 1.0 / imu_rate
        self.register_buffer("mean", torch.zeros(IMU_CHANNELS, 1))
        self.register_buffer("std", torch.ones(IMU_CHANNELS, 1))
        self.register_buffer("pre_mean", torch.zeros(PREINT_DIM))
        self.register_buffer("pre_std", torch.ones(PREINT_DIM))
        self.lstm = nn.LSTM(IMU_CHANNELS, hidden, batch_first=True)
        kernels = (7, 5, 3)  # MLSTM-FCN uses 8; odd kernels keep "same" padding symmetric
        layers, cin = [], IMU_CHANNELS
        for i, (c, k) in enumerate(zip(fcn, kernels)):
            layers += [nn.Conv1d(cin, c, k, padding="same"), norm_layer(norm, c, dim=1), nn.ReLU()]
            if i < 2:
                layers.append(_SqueezeExcite1d(c))
            cin = c
        self.fcn = nn.Sequential(*layers)
        self.out = nn.Linear(hidden + fcn[-1], dim)

    def set_statistics(self, imu: torch.Tensor) -> None:
        """Per-channel mean/std and pre-integration mean/std from training windows (N, 6, T)."""
        self.mean.copy_(imu.mean((0, 2))[:, None])
        self.std.copy_(imu.std((0, 2))[:, None].clamp_min(1e-6))
        pre = self.preintegrate(imu)
        self.pre_mean.copy_(pre.mean(0))
        self.pre_std.copy_(pre.std(0).clamp_min(1e-6))

    def _check(self, imu: torch.Tensor) -> None:
        if imu.dim() != 3 or imu.shape[1] != IMU_CHANNELS or imu.shape[2] != self.window:
            raise ValueError(f"IMU window must have shape (B, {IMU_CHANNELS}, {self.window}) = (batch, [acc xyz, "
                             f"gyro xyz], imu_rate/fps samples), got {tuple(imu.shape)}")

    def preintegrate(self, imu: torch.Tensor) -> torch.Tensor:
        """(B, 6, T) → (B, 9): [Σω·dt (rad), mean specific force, ΣΣ(a − ā)·dt² (displacement shape)].

        Σω·dt is the first-order integral of the body rate, i.e. log(R_aᵀR_b) of the frame pair up to bias,
        noise and the 100 Hz sampling of 8–30 Hz ringing (R² ≈ 0.8 against ground truth on the high-vibration
        tube). No gravity compensation is attempted for the displacement term: the window's absolute attitude is
        unknown, so removing the window mean is the honest first-order choice.
        """
        self._check(imu)
        acc, gyro = imu[:, :3], imu[:, 3:]
        centred = acc - acc.mean(-1, keepdim=True)
        disp = (centred.cumsum(-1) * self.dt).cumsum(-1)[..., -1] * self.dt
        return torch.cat([gyro.sum(-1) * self.dt, acc.mean(-1), disp], 1)

    def forward(self, imu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (v, standardised pre-integration z)."""
        self._check(imu)
        x = (imu - self.mean) / self.std
        _, (h, _) = self.lstm(x.transpose(1, 2))
        v = self.out(torch.cat([h[-1], self.fcn(x).mean(-1)], 1))
        return v, (self.preintegrate(imu) - self.pre_mean) / self.pre_std


class _SqueezeExcite1d(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, max(c // r, 1)), nn.Linear(max(c // r, 1), c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(-1)))))[..., None]


class FourierFusion(nn.Module):
    """Vibration-conditioned spectral modulation of a visual feature map; the identity while its 1×1 conv is 0.

    The rfft2 spectrum of each channel is split into ``bands`` radial frequency bands (band 0 holds DC). The
    vibration embedding sets one amplitude gate 2σ(·) per channel and band (phase is kept) and shifts each
    channel's DC coefficient; blur from vibration removes high frequencies, so band gates let the model
    re-weight what survives. Output: F + conv1×1(irfft2(X')), the 1×1 conv zero at init.
    """

    def __init__(self, channels: int, dim: int, bands: int = 3):
        super().__init__()
        self.channels, self.bands = channels, bands
        self.amp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, channels * bands))
        self.dc = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, channels))
        # The 1×1 projection is zero-initialised (a "zero conv", as in ControlNet), so the module starts as the
        # identity bit for bit. A scalar gain γ = 0 in front of zeroed MLP heads would also be the identity, but
        # it is a saddle: every fusion gradient then carries the factor γ or a constant gate (measured: |γ| ≤ 0.02
        # after 300 steps). The zero conv's own gradient is the regression of the upstream gradient on the
        # IMU-modulated features, non-zero from the first step (tested).
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def band_index(self, h: int, w: int, device=None) -> torch.Tensor:
        """(h, w//2+1) band of each rfft2 coefficient by normalised radial frequency; DC alone in band 0."""
        fy = torch.fft.fftfreq(h, device=device).abs()[:, None]
        fx = torch.fft.rfftfreq(w, device=device)[None, :]
        r = torch.sqrt(fy**2 + fx**2) / (0.5 * 2**0.5)  # in [0, 1]
        idx = 1 + (r * (self.bands - 1)).clamp(max=self.bands - 1.001).floor().long()
        idx = idx.clamp(max=self.bands - 1)
        idx[0, 0] = 0
        return idx

    def forward(self, feat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feat.shape
        spec = torch.fft.rfft2(feat.float(), norm="ortho")
        gates = 2 * torch.sigmoid(self.amp(v)).view(b, c, self.bands)
        spec = spec * gates[..., self.band_index(h, w, feat.device)]
        dc_mask = torch.zeros(h, w // 2 + 1, device=feat.device)
        dc_mask[0, 0] = 1.0
        spec = spec + (self.dc(v) * (h * w) ** 0.5)[..., None, None] * dc_mask  # +b at every pixel after irfft2
        fused = torch.fft.irfft2(spec, s=(h, w), norm="ortho").to(feat.dtype)
        return feat + self.proj(fused)


class PoseNet(nn.Module):
    """Relative pose of a frame pair (B, 6, H, W) → (axis-angle (B, 3), translation (B, 3)).

    With a vibration branch the IMU reaches the pose twice: through the Fourier fusion of the encoder
    bottleneck (the paper's module, embedding v) and through a *direct* zero-initialised linear map of the
    standardised pre-integration z added to the axis-angle (our addition: the bottleneck path has to route a
    rotation through three convs and a spatial mean, which a short run does not learn). The direct path is
    rotation only: one window fixes the relative rotation (gyro integral) but not the translation, which needs
    the unobserved velocity at the window start (a 6-D direct map of [v, z] overfitted the translation and
    doubled the ATE; with a wider window the metric IMU translation still hurt, as the network's translation
    is only defined up to its depth scale; docs/capsule.md). Both paths start at exactly zero, so an untrained
    V2 is the vision-only model.
    """

    def __init__(self, width: int, blocks: tuple[int, ...], vibration_dim: int = 0, norm: str = "batch"):
        super().__init__()
        self.encoder = ResNetEncoder(6, width, blocks, norm)
        c = self.encoder.channels[-1]
        self.squeeze = nn.Conv2d(c, 256 if width >= 64 else 4 * width, 1)
        mid = self.squeeze.out_channels
        self.conv1, self.conv2 = nn.Conv2d(mid, mid, 3, padding=1), nn.Conv2d(mid, mid, 3, padding=1)
        self.head = nn.Conv2d(mid, 6, 1)
        # created last: with the same seed, the vision weights equal the vision-only model's (a clean ablation)
        self.fusion = FourierFusion(c, vibration_dim) if vibration_dim else None
        self.imu_head = None
        if vibration_dim:
            self.imu_head = nn.Linear(PREINT_DIM, 3)
            nn.init.zeros_(self.imu_head.weight)
            nn.init.zeros_(self.imu_head.bias)

    def forward(self, pair: torch.Tensor, vib: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(pair)[-1]
        if self.fusion is not None and vib is not None:
            f = self.fusion(f, vib[0])
        x = F.relu(self.squeeze(f))
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        out = 0.01 * self.head(x).mean((2, 3))
        axisangle, translation = out[:, :3], out[:, 3:]
        if self.imu_head is not None and vib is not None:
            axisangle = axisangle + self.imu_head(vib[1])
        return axisangle, translation


@dataclass
class DepthOutput:
    disp: dict[int, torch.Tensor]  # scale → sigmoid disparity
    depth: torch.Tensor  # (B, 1, H, W) at scale 0


class V2SfMLearner(nn.Module):
    """Depth net + pose net (+ vibration branch and Fourier fusion when ``vibration`` is on).

    ``pose(frame_a, frame_b, imu)`` returns T mapping points of frame a's camera into frame b's camera
    (the Monodepth2 pair convention: for the pair (t, t+1) this is T_{t+1<-t}).
    """

    def __init__(self, *, height: int, width: int, depth_width: int = 64, depth_blocks: tuple[int, ...] = (2, 2, 2, 2),
                 pose_width: int = 64, pose_blocks: tuple[int, ...] = (2, 2, 2, 2),
                 decoder_channels: tuple[int, ...] = (16, 32, 64, 128, 256), scales: int = 4,
                 min_depth: float = 0.05, max_depth: float = 8.0, vibration: bool = True, imu_window: int = 10,
                 vibration_dim: int = 32, lstm_hidden: int = 16, imu_rate: float = 100.0, norm: str = "batch"):
        super().__init__()
        check_norm(norm)
        stride = 2 ** (max(len(depth_blocks), len(pose_blocks)) + 1)
        if height % stride or width % stride:
            raise ValueError(f"image size {height}x{width} is not divisible by the network stride {stride} "
                             f"(2^(1 + number of encoder stages)); pick a multiple of {stride} or fewer stages")
        if len(decoder_channels) < len(depth_blocks) + 1:
            raise ValueError(f"decoder_channels needs {len(depth_blocks) + 1} entries (one per encoder level), "
                             f"got {len(decoder_channels)}")
        self.height, self.width, self.min_depth, self.max_depth = height, width, min_depth, max_depth
        self.depth_encoder = ResNetEncoder(3, depth_width, tuple(depth_blocks), norm)
        self.depth_decoder = DepthDecoder(self.depth_encoder.channels, list(decoder_channels), scales)
        self.pose_net = PoseNet(pose_width, tuple(pose_blocks), vibration_dim if vibration else 0, norm)
        self.vibration = (VibrationBranch(imu_window, vibration_dim, lstm_hidden, imu_rate=imu_rate, norm=norm)
                          if vibration else None)

    @property
    def scales(self) -> list[int]:
        return self.depth_decoder.scales

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the model's {self.height}x{self.width}")

    def depth(self, image: torch.Tensor) -> DepthOutput:
        self._check(image)
        disp = self.depth_decoder(self.depth_encoder(image))
        return DepthOutput(disp, disp_to_depth(disp[0], self.min_depth, self.max_depth)[1])

    def pose_parameters(self, frame_a: torch.Tensor, frame_b: torch.Tensor, imu: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(axis-angle, translation) of T_{b<-a}; the IMU is ignored by the vision-only model."""
        self._check(frame_a)
        vib = self.vibration(imu) if (self.vibration is not None and imu is not None) else None
        return self.pose_net(torch.cat([frame_a, frame_b], 1), vib)

    def pose(self, frame_a: torch.Tensor, frame_b: torch.Tensor, imu: torch.Tensor | None = None) -> torch.Tensor:
        return transformation_from_parameters(*self.pose_parameters(frame_a, frame_b, imu))


def build_v2_sfmlearner(**kwargs) -> V2SfMLearner:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return V2SfMLearner(**kwargs)
