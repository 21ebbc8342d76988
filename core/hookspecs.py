"""Every hook a plait plugin can implement.

Two families:

* ``register_<kind>(register)`` hooks are called once, when plugins load. Each receives a ``register``
  callable that adds entries to the core registry of that kind::

      register(name, factory, config=SchemaDataclass, doc="one line", **extra)

  ``factory`` builds the object from the entry's config fields (plain keyword arguments) plus the run-time
  objects the recipe passes in. ``config`` is a dataclass: it is the schema the YAML node is validated against.
* ``on_run_*`` hooks observe a run's lifecycle. They are called at run boundaries, never inside a step loop
  (``on_log`` implementations are resolved once at run start and then called as plain functions).

A plugin implements hooks with ``plait.hookimpl`` and is found in ``plait.manager.DEFAULT_PLUGINS`` (builtins)
or through the ``plait`` entry-point group (third-party packages). docs/plugins.md documents each hook.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("plait")


@hookspec
def register_model_families(register):
    """Register model builders (config section ``model:``).

    :param register: ``register(name, factory, config=Dataclass, doc="...")``. ``factory(**fields, **runtime)``
        returns the built model object (for language models a ``ModelBundle`` with ``model`` and ``tokenizer``).

    Example::

        @hookimpl
        def register_model_families(register):
            register("hf_causal_lm", build_hf_causal_lm, config=HFCausalLMConfig, doc="HF OPT/Qwen3/LLaMA")
    """


@hookspec
def register_offload_policies(register):
    """Register parameter placement policies (config section ``offload:``): where parameters live and how
    they stream to the compute device.

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; ``factory(model=..., device=...,
        **fields)`` returns an object satisfying ``plait.protocols.OffloadPolicy``.

    Example::

        @hookimpl
        def register_offload_policies(register):
            register("none", KeepOnDevice, config=NoOffloadConfig, doc="every parameter on the compute device")
    """


@hookspec
def register_perturbations(register):
    """Register zeroth-order perturbation strategies (config section ``perturbation:``).

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns an object
        satisfying ``plait.protocols.Perturbation``.

    Example::

        @hookimpl
        def register_perturbations(register):
            register("mezo", MeZOPerturbation, config=MeZOConfig, doc="seeded SPSA, z never stored")
    """


@hookspec
def register_grad_transforms(register):
    """Register gradient transforms (config section ``grad_transform:``): clipping, DP noise, SAM ascent.

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns an object
        satisfying ``plait.protocols.GradTransform``.

    Example::

        @hookimpl
        def register_grad_transforms(register):
            register("clip", ClipGradNorm, config=ClipConfig, doc="global grad-norm clipping")
    """


@hookspec
def register_sampler_schedulers(register):
    """Register rollout schedulers (config section ``sampler:``) that decide which sequences decode together.

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns an object
        satisfying ``plait.protocols.SamplerScheduler``.

    Example::

        @hookimpl
        def register_sampler_schedulers(register):
            register("full-group", FullGroupScheduler, config=FullGroupConfig, doc="all G samples at once")
    """


@hookspec
def register_influence_estimators(register):
    """Register data-attribution estimators (config section ``influence:``).

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns an object
        satisfying ``plait.protocols.InfluenceEstimator``.

    Example::

        @hookimpl
        def register_influence_estimators(register):
            register("if-lissa", LissaInfluence, config=LissaConfig, doc="inverse-HVP by LiSSA")
    """


@hookspec
def register_recipes(register):
    """Register recipes (config section ``recipe:``): the programs that own a run's loop.

    :param register: ``register(name, factory, config=Dataclass, doc="...", requires=("model", "data"))``.
        ``factory(run=run, **fields)`` returns an object with a ``__call__()`` that performs the run and returns
        a dict of final metrics. ``requires`` names the config sections the recipe builds; they are checked by
        ``plait validate``.

    Example::

        @hookimpl
        def register_recipes(register):
            register("sft", SFTRecipe, config=SFTConfig, doc="first-order fine-tuning", requires=("model", "data"))
    """


@hookspec
def register_datasets(register):
    """Register data sources (config section ``data:``).

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns a dataset
        object (for text: ``examples(split) -> list[dict]``).

    Example::

        @hookimpl
        def register_datasets(register):
            register("jsonl", JsonlDataset, config=JsonlConfig, doc="prompt/completion or text/label lines")
    """


@hookspec
def register_parallel_strategies(register):
    """Register parallel strategies (config section ``parallel:``): how work is split across processes.

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; the factory returns an object
        satisfying ``plait.protocols.ParallelStrategy``.

    Example::

        @hookimpl
        def register_parallel_strategies(register):
            register("single", SingleProcess, config=SingleConfig, doc="one process, no communication")
    """


@hookspec
def register_model_transforms(register):
    """Register module swaps applied to a model after it is built (config list ``transforms:``).

    :param register: ``register(name, factory, config=Dataclass, doc="...")``; ``factory(**fields)`` returns a
        callable ``transform(model) -> model`` applied in list order.

    Example::

        @hookimpl
        def register_model_transforms(register):
            register("freeze", FreezeParameters, config=FreezeConfig, doc="set requires_grad=False by pattern")
    """


@hookspec
def register_commands(cli):
    """Add verbs to the ``plait`` command line.

    :param cli: the ``argparse`` sub-parsers object of ``plait``. Add a parser and set ``func`` to a handler
        ``handler(args) -> int`` (the exit code).

    Example::

        @hookimpl
        def register_commands(cli):
            parser = cli.add_parser("attribute", help="score training examples of a finished run")
            parser.add_argument("run_dir")
            parser.set_defaults(func=lambda args: attribute(args.run_dir))
    """


@hookspec
def on_run_start(run):
    """Called once when a run's directory, logger, checkpointer and recipe exist, before the recipe runs.

    :param run: the ``plait.run.Run`` (``run.cfg``, ``run.dir``, ``run.device``, ``run.logger``).

    Example::

        @hookimpl
        def on_run_start(run):
            run.logger.text("notes/host", socket.gethostname())
    """


@hookspec
def on_log(run, step, metrics):
    """Called each time metrics are logged; may add entries to ``metrics`` in place before they are written.

    Implementations are resolved once at run start and then called directly (no pluggy dispatch in the loop).

    :param run: the ``plait.run.Run``.
    :param step: the training step (int).
    :param metrics: dict of ``/``-namespaced tag to float, e.g. ``{"train/loss": 2.3}``.

    Example::

        @hookimpl
        def on_log(run, step, metrics):
            metrics["train/ppl"] = math.exp(metrics["train/loss"]) if "train/loss" in metrics else None
    """


@hookspec
def on_run_end(run, status):
    """Called once when the recipe returns or stops.

    :param run: the ``plait.run.Run``.
    :param status: ``"completed"``, ``"interrupted"`` or ``"failed"``.

    Example::

        @hookimpl
        def on_run_end(run, status):
            print(f"{run.dir}: {status}")
    """
