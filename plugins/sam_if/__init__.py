"""Builtin plugin ``sam_if``: SAM / ASAM training and data attribution for SAM-trained models
("Attributing Data for Sharpness-Aware Minimization", arXiv 2507.04059).

Registers
* grad transform ``sam`` (SAM / ASAM for first-order recipes such as ``sft``);
* influence estimators ``if`` (Koh & Liang), ``sam_hessian`` (closed form at the final weights, with the
  perturbation's data dependence), ``tracin`` and ``sam_trajectory`` (from a recorded SAM trajectory), ``ekfac``
  (EK-FAC on chosen Linear modules, `ekfac`); `projected.CheckpointTracIn` sums TracIn over saved checkpoints of
  any module with randomly projected per-example gradients;
* datasets ``digits`` / ``breast_cancer`` (scikit-learn bundled, label flips) and model family ``tabular_mlp``;
* recipe ``sam_train`` (`recipe`; before a private ``grad_transform:`` such as flashdp, DP-SAT) and the CLI verb
  ``plait attribute RUN_DIR [estimator=…]`` (`attribute`).

Python API::

    from plait.plugins.sam_if.data import load_tabular, TabularMLP
    from plait.plugins.sam_if.sam import train_sam, sam_step
    from plait.plugins.sam_if.influence import IFEstimator, SAMHessianEstimator, TrajectoryEstimator

    data = load_tabular("digits", n_train=1000, n_test=300, flip_fraction=0.1)
    model = TabularMLP(64, 10)
    train_sam(model, data.train.X, data.train.y, rho=0.05, l2=1e-2, lr=0.5, steps=2000, record_dir="traj")
    scores = SAMHessianEstimator(rho=0.05, l2=1e-2).scores(model, data.train, data.test)  # [n_train, n_test]

Modules: ``functional`` (flat parameters, objective, SAM field), ``solvers``, ``sam``, ``influence``, ``data``,
``config``. Heavy imports (scikit-learn, torch.func) happen in the factories.
"""
from __future__ import annotations

from plait import hookimpl

from .config import (
    EKFACConfig,
    IFConfig,
    SAMConfig,
    SAMHessianConfig,
    SAMTrainConfig,
    SAMTrajectoryConfig,
    TabularConfig,
    TabularMLPConfig,
    TracInConfig,
    check_sam_train_components,
)


def build_sam(**kwargs):
    from .sam import SAMTransform

    return SAMTransform(**kwargs)


def build_if(**kwargs):
    from .influence import IFEstimator

    return IFEstimator(**kwargs)


def build_sam_hessian(**kwargs):
    from .influence import SAMHessianEstimator

    return SAMHessianEstimator(**kwargs)


def build_tracin(**kwargs):
    from .config import CHECKPOINT_TRACIN_DEFAULTS
    from .influence import TrajectoryEstimator

    given = [k for k, v in CHECKPOINT_TRACIN_DEFAULTS.items() if kwargs.pop(k, v) != v]
    if given:
        raise ValueError(f"{', '.join(given)}: options of tracin over a run's checkpoints (sft, classify runs and "
                         f"the influence: section), not of tracin over a recorded sam_train trajectory")
    return TrajectoryEstimator(**kwargs)


def build_ekfac(l2: float = 0.0, damping: float = 1e-3, **kwargs):
    from .ekfac import EKFACEstimator

    return EKFACEstimator(damping=damping + l2, **kwargs)


def build_sam_trajectory(**kwargs):
    from .influence import TrajectoryEstimator

    return TrajectoryEstimator(**{"in_batch": True, "coupling": True, **kwargs})


def build_digits(**kwargs):
    from .data import load_tabular

    return load_tabular("digits", **kwargs)


def build_breast_cancer(**kwargs):
    from .data import load_tabular

    return load_tabular("breast_cancer", **kwargs)


def build_sam_train(run, **kwargs):
    from .sam_train_recipe import SAMTrainRecipe

    return SAMTrainRecipe(run, **kwargs)


def build_tabular_mlp(**kwargs):
    from .data import build_tabular_mlp as build

    return build(**kwargs)


@hookimpl
def register_grad_transforms(register):
    register("sam", build_sam, config=SAMConfig,
             doc="SAM / ASAM: gradient at w + ρ·g/‖g‖ (adaptive: ρ·T²g/‖Tg‖); before a DP transform, DP-SAT",
             reads_data=True, composes_before_private=True, check=build_sam)


@hookimpl
def register_influence_estimators(register):
    from .section import check_tracin_section, refuse_at_end_of_run

    register("if", build_if, config=IFConfig, after_run=refuse_at_end_of_run("if"),
             doc="Koh & Liang influence, (H + λI)⁻¹ by explicit solve, CG, GMRES or LiSSA (torch.func HVPs)")
    register("sam_hessian", build_sam_hessian, config=SAMHessianConfig, after_run=refuse_at_end_of_run("sam_hessian"),
             doc="SAM influence at the final weights with the data-dependent perturbation (non-symmetric solve)")
    register("tracin", build_tracin, config=TracInConfig, after_run=check_tracin_section,
             doc="TracIn-CP over a recorded SAM trajectory or any first-order run's checkpoints (influence: section)")
    register("sam_trajectory", build_sam_trajectory, config=SAMTrajectoryConfig,
             after_run=refuse_at_end_of_run("sam_trajectory"),
             doc="trajectory influence for SAM: in-batch TracIn plus the perturbation-coupling HVP term")
    register("ekfac", build_ekfac, config=EKFACConfig, after_run=refuse_at_end_of_run("ekfac"),
             doc="EK-FAC influence (as kronfluence) on chosen Linear modules, damping as an option")


@hookimpl
def register_datasets(register):
    register("digits", build_digits, config=TabularConfig,
             doc="scikit-learn digits (1,797 × 64, 10 classes), standardised, optional label flips")
    register("breast_cancer", build_breast_cancer, config=TabularConfig, renamed_from=("breast-cancer",),
             doc="scikit-learn breast cancer (569 × 30, 2 classes), standardised, optional label flips")


@hookimpl
def register_model_families(register):
    register("tabular_mlp", build_tabular_mlp, config=TabularMLPConfig, renamed_from=("tabular-mlp",),
             doc="logistic regression or a small tanh MLP over tabular features (float64 by default)")


@hookimpl
def register_recipes(register):
    register("sam_train", build_sam_train, config=SAMTrainConfig, requires=("model", "data"),
             uses=("grad_transform", "transforms"), check_components=check_sam_train_components,
             doc="SAM / ASAM + SGD of tabular_mlp on a tabular dataset (before a private grad_transform: DP-SAT); "
                 "record_trajectory for trajectory influence")


@hookimpl
def register_commands(cli):
    from .attribute import add_parser

    add_parser(cli)


@hookimpl
def on_run_end(run, status):
    """A completed run with an ``influence:`` section: self-influence over its checkpoints (`section`)."""
    has = getattr(run, "has", None)  # observers may be called with a stand-in run (tests, tracing)
    if status == "completed" and has is not None and has("influence") and run.rank == 0:
        from .section import run_influence

        run_influence(run)
