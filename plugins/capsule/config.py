"""Config dataclasses (schemas) of the capsule plugin."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TubeConfig:
    """Dataset ``capsule_tube``: synthetic capsule in a textured tube (depth, pose, IMU, vibration)."""

    height: int = 64
    width: int = 80
    vibration: str = "low"  # none | low | high (collision rate, amplitude, image noise)
    train_sequences: int = 4  # >= 1
    test_sequences: int = 2  # >= 1
    num_frames: int = 40  # per sequence
    seed: int = 0
    fps: float = 10.0
    imu_rate: float = 100.0  # a whole multiple of fps; the IMU window has imu_rate/fps samples
    fold: float = 0.12  # radial fold amplitude (fraction of the radius)
    blur_subframes: int = 3  # renders averaged over the exposure (motion blur)
    far: float = 8.0  # rays beyond this depth see the dark lumen (invalid depth)


@dataclass
class VideoIMUConfig:
    """Dataset ``capsule_video``: real frames + IMU CSV (layout in docs/capsule.md)."""

    root: str = "???"
    height: int = 64
    width: int = 80
    imu_rate: float = 100.0  # expected IMU sampling rate (Hz); checked against the CSV timestamps
    test_fraction: float = 0.25  # trailing frames held out (at least 5); strictly between 0 and 1


@dataclass
class LesionConfig:
    """Dataset ``capsule_lesions``: synthetic 14-class long-tailed capsule images (Kvasir-Capsule proportions)."""

    num_images: int = 1400  # total; classes follow Kvasir-Capsule proportions with a floor of min_per_class
    image_size: int = 32
    min_per_class: int = 10
    test_fraction: float = 0.3  # stratified; strictly between 0 and 1
    difficulty: float = 0.5  # 0: large high-contrast lesions … 1: small faint ones
    flip_fraction: float = 0.0  # share of training labels replaced by another class (seeded); [0, 1)
    seed: int = 0


@dataclass
class RedLesionConfig:
    """Dataset ``capsule_red_lesions``: synthetic binary red lesion (angiectasia/bleeding) vs normal, ~1:2."""

    num_images: int = 600
    image_size: int = 32
    test_fraction: float = 0.3  # stratified; strictly between 0 and 1
    difficulty: float = 0.5
    flip_fraction: float = 0.0  # share of training labels replaced by another class (seeded); [0, 1)
    seed: int = 0


@dataclass
class ImageFolderConfig:
    """Dataset ``capsule_image_folder``: root/<class>/<image> (Kvasir-Capsule layout), PNG/JPEG/PPM/BMP."""

    root: str = "???"
    image_size: int = 64
    test_fraction: float = 0.3  # stratified (each class needs >= 2 images); strictly between 0 and 1
    seed: int = 0


@dataclass
class V2SfMLearnerConfig:
    """Model family ``v2_sfmlearner``: depth net + pose net (+ vibration branch and Fourier fusion)."""

    depth_width: int = 64  # 64 with blocks [2,2,2,2] is ResNet-18
    depth_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    pose_width: int = 64
    pose_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    decoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    scales: int = 4
    vibration: bool = True  # false: the vision-only ablation
    vibration_dim: int = 32
    lstm_hidden: int = 16
    norm: str = "batch"  # batch (Monodepth2) | group: GroupNorm, per sample, so a private grad_transform is exact
    seed: int = 0


@dataclass
class PiTConfig:
    """Model family ``pit``: preset ti | xs | s | b, or '' for the custom sizes below."""

    preset: str = ""
    image_size: int = 32
    num_classes: int = 14
    patch: int = 4
    stride: int = 2
    base_dims: list[int] = field(default_factory=lambda: [16, 16, 16])
    depth: list[int] = field(default_factory=lambda: [1, 2, 1])
    heads: list[int] = field(default_factory=lambda: [1, 2, 4])
    drop_path: float = 0.0
    seed: int = 0


@dataclass
class ViTConfig:
    """Model family ``vit``: plain ViT ablation (one token grid, no pooling)."""

    image_size: int = 32
    num_classes: int = 14
    patch: int = 4
    stride: int = 4
    dim: int = 32
    depth: int = 4
    heads: int = 2
    drop_path: float = 0.0
    seed: int = 0


@dataclass
class DepthRecipeConfig:
    """Recipe ``depth``: self-supervised depth + ego-motion (steps: ``run.steps``). Adam on the shared first-order
    step: accepts ``grad_transform:`` (a private one only with ``model.norm: group``: BatchNorm mixes the samples)
    and ``transforms:``."""

    lr: float = 1.0e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    lr_step: int = 0  # LR × 0.1 after every lr_step steps (schedule "step", = StepLR stepped per step); 0: constant
    ssim_weight: float = 0.85
    smoothness: float = 1.0e-3  # divided by 2^scale
    automask: bool = True
    multiscale: bool = True  # false: scale 0 only
    eval_snippet: int = 5  # frames per ATE snippet; 2 to the test sequences' num_frames
    gyro_weight: float = 0.0  # auxiliary |pose rotation − integrated gyro| loss (V2 only; 0: off)
    log_images: bool = True  # depth maps and warped frames in TensorBoard at each evaluation


@dataclass
class ClassifyRecipeConfig:
    """Recipe ``classify``: from-scratch image classification with imbalance handling (steps: ``run.steps``).
    AdamW (decay / no-decay groups), warm-up + cosine, on the shared first-order step: accepts ``grad_transform:``
    (sam, flashdp, dp_flat, chains) and ``transforms:``."""

    lr: float = 1.0e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_steps: int = 20
    loss: str = "ce"  # ce | weighted_ce | focal
    class_weighting: str = "inverse"  # inverse (1/n_c) | effective (Cui et al., β below); for weighted_ce/focal
    beta: float = 0.999
    focal_gamma: float = 2.0
    sampler: str = "uniform"  # uniform | weighted (each class drawn equally often)
    label_smoothing: float = 0.0
    augment: bool = True  # random flips and 90° rotations (capsule images have no canonical orientation)


def check_v2_sfmlearner(norm: str = "batch", **_: object) -> None:
    """Model ``v2_sfmlearner``'s checks at validate (the entry's ``check=``), without building the nets."""
    if norm not in ("batch", "group"):
        raise ValueError(f"model.norm: {norm!r} is not supported; allowed: batch, group")


def check_depth_components(components: dict) -> None:
    """Recipe ``depth`` across sections, at ``plait validate`` (the entry's ``check_components``): a private
    ``grad_transform:`` needs per-sample gradients, which a training-mode BatchNorm (``model.norm: batch``, the
    default) does not have: it normalises with the batch's statistics, mixing the samples."""
    from plait.errors import ConfigError

    chain = components.get("grad_transform")
    model = components.get("model")
    if chain is None or model is None:
        return
    members = chain if isinstance(chain, list) else [chain]
    private = [(i, c.entry.name) for i, c in enumerate(members) if c.entry.extra.get("private")]
    if not private:
        return
    i, name = private[0]
    where = f"grad_transform[{i}]" if isinstance(chain, list) else "grad_transform"
    if getattr(model.options, "norm", None) == "batch":
        raise ConfigError(f"{where}: the private {name!r} needs per-sample gradients, but model "
                          f"{model.entry.name!r} with norm: batch normalises with the batch's statistics (BatchNorm "
                          f"mixes the samples); set model.norm=group (GroupNorm, per sample) or remove {name!r}")
    # The pose net (and the vibration branch) run twice per snippet, once per frame pair; the DP layers clip the
    # gradient of one call per step, so these must be left out of DP (frozen, listed in dp/frozen).
    import fnmatch

    skip = list(getattr(members[i].options, "skip", []) or [])
    twice = ["pose_net"] + (["vibration"] if getattr(model.options, "vibration", False) else [])
    # representative module names of each net (first, middle, last layer): every one must be skipped
    names = {"pose_net": ["pose_net.encoder.conv1", "pose_net.squeeze", "pose_net.head"],
             "vibration": ["vibration.lstm", "vibration.fcn.0", "vibration.out"]}
    missing = [m for m in twice if not all(any(fnmatch.fnmatchcase(n, p) for p in skip) for n in names[m])]
    if missing:
        pats = ", ".join(f"'{m}*'" for m in twice)
        verb = "runs" if len(missing) == 1 else "run"
        raise ConfigError(f"{where}.skip: {' and '.join(missing)} {verb} twice per snippet (once per frame pair) and "
                          f"the private {name!r} clips one call per step; leave them out of DP "
                          f"({where}.skip=[{pats}]: frozen, listed in dp/frozen) or remove {name!r}")
