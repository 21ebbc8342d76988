"""Builtin plugin ``capsule``: capsule endoscopy models.

* V2-SfMLearner (Bai et al., IEEE T-ASE 2025): self-supervised depth + ego-motion with a vibration (IMU) branch
  and Fourier fusion on a Monodepth2-style depth/pose net; the vision-only model is the exact ablation
  (model ``v2_sfmlearner`` with ``vibration: false``), recipe ``depth``, datasets ``capsule_tube``
  (synthetic, known depth/pose/IMU) and ``capsule_video`` (frames + IMU CSV).
* Transformer lesion classification (Bai et al., Electronics 2022): pooling ViT ``pit`` (Ti/XS/S/B presets or
  custom) and the plain ``vit`` ablation, recipe ``classify`` (class-weighted CE / focal / balanced sampler),
  datasets ``capsule_lesions`` (14 classes, Kvasir-Capsule proportions), ``capsule_red_lesions`` (binary) and
  ``capsule_image_folder`` (root/<class>/<image>).

Modules: ``geometry`` (backproject/project/warp, Rodrigues, disp_to_depth), ``losses`` (SSIM+L1, min
reprojection, auto-mask, smoothness), ``depthnet``, ``pit``, ``tube``, ``lesions``, ``real`` (file loaders),
``metrics``, ``depth_recipe``, ``classify_recipe``, ``config``. Heavy work happens in the factories.
"""
from __future__ import annotations

from plait import hookimpl

from .config import (
    ClassifyRecipeConfig,
    DepthRecipeConfig,
    ImageFolderConfig,
    LesionConfig,
    PiTConfig,
    RedLesionConfig,
    TubeConfig,
    V2SfMLearnerConfig,
    VideoIMUConfig,
    ViTConfig,
    check_depth_components,
    check_v2_sfmlearner,
)


def build_v2(**kwargs):
    from .depthnet import build_v2_sfmlearner

    return build_v2_sfmlearner(**kwargs)


def build_pit(**kwargs):
    from .pit import build_pit as build

    return build(**kwargs)


def build_vit(**kwargs):
    from .pit import build_vit as build

    return build(**kwargs)


def build_tube(**kwargs):
    from .tube import load_tube

    return load_tube(**kwargs)


def build_video(**kwargs):
    from .real import load_video_imu

    return load_video_imu(**kwargs)


def build_lesions(**kwargs):
    from .lesions import make_lesions

    return make_lesions(**kwargs)


def build_red_lesions(**kwargs):
    from .lesions import make_red_lesions

    return make_red_lesions(**kwargs)


def build_image_folder(**kwargs):
    from .real import load_image_folder

    return load_image_folder(**kwargs)


def build_depth(run, **kwargs):
    from .depth_recipe import DepthRecipe

    return DepthRecipe(run, **kwargs)


def build_classify(run, **kwargs):
    from .classify_recipe import ClassifyRecipe

    return ClassifyRecipe(run, **kwargs)


@hookimpl
def register_model_families(register):
    register("v2_sfmlearner", build_v2, config=V2SfMLearnerConfig, check=check_v2_sfmlearner,
             doc="Monodepth2-style depth + pose nets with an IMU vibration branch and Fourier fusion (zero-conv init)")
    register("pit", build_pit, config=PiTConfig,
             doc="pooling vision transformer (overlapping patches, depthwise-conv pooling), Ti/XS/S/B or custom")
    register("vit", build_vit, config=ViTConfig, doc="plain ViT (single token grid, no pooling): the PiT ablation")


@hookimpl
def register_datasets(register):
    register("capsule_tube", build_tube, config=TubeConfig,
             doc="synthetic capsule in a textured tube: frames, depth, pose, IMU; low/high collision vibration")
    register("capsule_video", build_video, config=VideoIMUConfig,
             doc="real capsule video: frames/*.png + imu.csv + frames.csv + intrinsics.json (no ground truth)")
    register("capsule_lesions", build_lesions, config=LesionConfig,
             doc="synthetic 14-class capsule lesion images with Kvasir-Capsule's long-tailed proportions")
    register("capsule_red_lesions", build_red_lesions, config=RedLesionConfig,
             doc="synthetic binary red-lesion (angiectasia/bleeding) vs normal capsule images, ~1:2")
    register("capsule_image_folder", build_image_folder, config=ImageFolderConfig,
             doc="root/<class>/<image> classification folders (Kvasir-Capsule layout)")


@hookimpl
def register_recipes(register):
    register("depth", build_depth, config=DepthRecipeConfig, requires=("model", "data"),
             uses=("grad_transform", "transforms"), check_components=check_depth_components,
             doc="self-supervised depth + ego-motion: min reprojection, auto-mask, smoothness; AbsRel and ATE")
    register("classify", build_classify, config=ClassifyRecipeConfig, requires=("model", "data"),
             uses=("grad_transform", "transforms"),
             doc="from-scratch image classification with class weights / focal / balanced sampling; bal. acc, MCC")
