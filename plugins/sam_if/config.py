"""Config dataclasses (schemas) of the sam_if plugin."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SAMConfig:
    """Gradient transform ``sam``: SAM (adaptive=false) or ASAM (adaptive=true)."""

    rho: float = 0.05  # perturbation radius ρ (Foret et al.: 0.05 on CIFAR; ASAM typically 0.5-2)
    adaptive: bool = False  # ASAM: e = ρ T²g/‖Tg‖, T = |w| + eta
    eta: float = 0.01  # ASAM's η (Kwon et al. 0.01; davda54/sam uses 0)
    eps: float = 1.0e-12  # added to the norm in the denominator
    replay_forward: bool = True  # without a recipe-supplied loss closure, replay the step's recorded forwards


@dataclass
class IFConfig:
    """Influence estimator ``if`` (Koh & Liang)."""

    l2: float = 0.0  # the L2 coefficient of the training objective (must match training)
    damping: float = 0.0  # λ in (H + λI)
    solver: str = "explicit"  # explicit | cg | gmres | lissa
    tol: float = 1.0e-8  # relative residual every solve must reach (else SolverError)
    maxiter: int = 1000
    restart: int = 60  # GMRES restart length
    lissa_scale: float | None = None  # None: 0.6 (λ_max + λ) by power iteration
    lissa_depth: int = 20000
    lissa_batch_size: int | None = None  # None: deterministic full-batch HVPs
    seed: int = 0


@dataclass
class SAMHessianConfig:
    """Influence estimator ``sam_hessian``: implicit differentiation of SAM's fixed point at the final weights."""

    rho: float = 0.05  # must match training
    adaptive: bool = False
    eta: float = 0.01
    eps: float = 1.0e-12
    m: int | None = None  # m-sharpness group size used in training (None: one group, full-batch SAM)
    variant: str = "full"  # full (data-dependent perturbation) | naive (e frozen: IF at w + e)
    l2: float = 0.0
    damping: float = 0.0
    solver: str = "explicit"  # explicit | gmres | normal_cg
    tol: float = 1.0e-8
    maxiter: int = 1000
    restart: int = 60
    max_stationarity: float | None = None  # refuse when ‖F(ŵ)‖ exceeds this (None: report only)


@dataclass
class _TrajectoryFields:
    """Options of ``tracin`` / ``sam_trajectory`` over a trajectory recorded by train_sam."""

    trajectory: str = ""  # directory holding trajectory.safetensors + trajectory.json
    perturbed: bool = True  # training gradients at w_t + e_t (what SAM stepped with)
    in_batch: bool = False  # count only steps whose batch holds the example (weight η_t·n/|B_t|)
    coupling: bool = False  # add the perturbation's data-dependence term (one HVP per checkpoint and group)
    l2: float | None = None  # None: from the trajectory's metadata
    every: int = 1  # use every k-th recorded checkpoint


# the options of TracIn over a run's saved checkpoints (`anyrun`; any first-order run), with their defaults
CHECKPOINT_TRACIN_DEFAULTS = {"k": 0, "projection": "rademacher", "seed": 0, "batch_size": 16, "params": ["*"],
                              "n": 0, "top": 10, "allow_private_data": False, "against": "self"}


@dataclass
class TracInConfig(_TrajectoryFields):
    """Influence estimator ``tracin``: over a trajectory recorded by train_sam (``plait attribute`` on a sam_train
    run), or over the saved checkpoints of any first-order run (the ``influence:`` section; ``plait attribute``
    on sft / classify runs) with the options below."""

    k: int = 0  # projection dimension of per-example gradients (0: no projection, exact)
    projection: str = "rademacher"  # rademacher | gaussian | orthogonal | none
    seed: int = 0  # projection seed
    batch_size: int = 16  # examples per gradient batch
    params: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on parameter names
    n: int = 0  # score the first n training examples (0: all)
    top: int = 10  # rows of attribution/report.md and of the TensorBoard text
    allow_private_data: bool = False  # the influence: section on a DP run: the scores are not private
    against: str = "self"  # the influence: section: self (self-influence) | eval (train x eval-set scores)


@dataclass
class SAMTrajectoryConfig(_TrajectoryFields):
    """``sam_trajectory``: TracIn with the e-coupling term, counting in-batch steps."""

    in_batch: bool = True
    coupling: bool = True


@dataclass
class EKFACConfig:
    """Influence estimator ``ekfac``: EK-FAC on chosen Linear modules (`ekfac.EKFACEstimator`)."""

    params: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on Linear module names
    damping: float = 1.0e-3  # λ added to every eigenvalue
    damping_ratio: float = 0.0  # plus ratio × mean(Λ) per layer (kronfluence's heuristic uses 0.1)
    loss: str = "ce"  # ce | mse
    batch_size: int = 256  # rows per factor / gradient pass
    fisher: str = "true"  # true (exact expectation over the model's labels) | empirical (the true labels)
    l2: float = 0.0  # the objective's (l2/2)‖w‖²: its Hessian l2·I is added to the damping (exact)


@dataclass
class TabularConfig:
    """Datasets ``digits`` / ``breast_cancer`` (scikit-learn bundled, no download)."""

    n_train: int | None = None  # None: 70% of the rows
    n_test: int | None = None  # None: the rest
    flip_fraction: float = 0.0  # fraction of training labels replaced by another class
    seed: int = 0  # shuffle, split and flips
    standardize: bool = True
    dtype: str = "float64"


@dataclass
class TabularMLPConfig:
    """Model family ``tabular_mlp``: logistic regression (hidden: []) or a tanh MLP returning logits."""

    num_features: int = field(default=64, metadata={"renamed_from": ("n_features",)})  # as pit's / vit's
    num_classes: int = field(default=10, metadata={"renamed_from": ("n_classes",)})
    hidden: list[int] = field(default_factory=list)
    dtype: str = "float64"
    seed: int = 0


@dataclass
class SAMTrainConfig:
    """Recipe ``sam_train``: SAM / ASAM + SGD on a tabular dataset (steps: ``run.steps``); before a private
    ``grad_transform:`` (flashdp, dp_flat) the SAM runs as DP-SAT."""

    rho: float = 0.05  # perturbation radius ρ (0: plain SGD)
    adaptive: bool = False  # ASAM
    eta: float = 0.01  # ASAM's η
    eps: float = 1.0e-12
    lr: float = 0.5
    schedule: str = "constant"  # constant | linear | cosine (decay to lr·min_lr_ratio at run.steps)
    min_lr_ratio: float = 0.0
    momentum: float = 0.0  # SGD momentum (recorded in the trajectory's metadata)
    l2: float = 1.0e-2  # (l2/2)‖w‖² in the objective (under DP: SGD weight decay); the attribute verb uses it
    batch_size: int = 0  # 0: full batch
    m: int | None = None  # m-sharpness group size (None: one perturbation per batch; not with grad_transform)
    record_trajectory: bool = False  # write <run dir>/trajectory/ for the tracin / sam_trajectory estimators
    record_every: int = 1


def check_sam_train_components(components: dict) -> None:
    """What recipe ``sam_train`` refuses across sections, at ``plait validate`` (the entry's ``check_components``)
    and again when it builds: a ``sam`` transform (the recipe already does SAM: recipe.rho / recipe.adaptive, which
    before a private transform runs as DP-SAT) and m-sharpness with any ``grad_transform:`` (one perturbation per
    step is taken through the chain). ``components``: section -> validated component (a list for a chain)."""
    from plait.errors import ConfigError

    chain = components.get("grad_transform")
    if chain is None:
        return
    members = chain if isinstance(chain, list) else [chain]
    names = [c.entry.name for c in members]
    if "sam" in names:
        raise ConfigError(f"grad_transform[{names.index('sam')}]: 'sam' under recipe sam_train, which already does "
                          f"SAM; remove it and set recipe.rho / recipe.adaptive (before a private transform the "
                          f"recipe's SAM runs as DP-SAT)")
    m = getattr(getattr(components.get("recipe"), "options", None), "m", None)
    if m is not None:
        raise ConfigError(f"recipe.m: m-sharpness (m={m}) does not combine with grad_transform {'+'.join(names)} "
                          f"(one perturbation per step, taken through the chain); set recipe.m=null")
