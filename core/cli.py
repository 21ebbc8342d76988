"""The ``plait`` command line.

    plait run CONFIG [key=value …] [~key …]     compose and perform a run
    plait run --nproc N CONFIG […]               the same on N local processes (starts torchrun for you)
    plait validate CONFIG [key=value …]          resolve and check every section's schema, build nothing
    plait config CONFIG [key=value …]            print the resolved config as YAML
    plait plugins [--json]                       loaded plugins, versions, hooks, load errors
    plait hooks                                  every hook spec: signature and first doc line
    plait ls [KIND] [--json]                     registry entries and the plugin providing each

CONFIG is a YAML path, or the name of a preset under the repository's ``configs/`` (``quickstart``,
``zo2/opt``); without CONFIG, ``run``/``validate``/``config`` use ``configs/quickstart.yaml``.
User errors print one line and exit 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

from . import __version__, hookspecs
from .errors import ConfigError, PlaitError
from .registry import KINDS, KINDS_BY_NAME, KINDS_BY_SECTION

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "quickstart"


def find_config(name: str | None) -> Path:
    """A path as given, else a preset name under ``configs/`` (with or without ``.yaml``)."""
    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return path  # load_config reports it missing, naming the path


def _compose_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or preset name (default: quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value to set, ~key to delete")


def _split_config_arg(args) -> tuple[Path, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and ("=" in config or config.startswith("~")):
        config, overrides = None, [config] + overrides  # `plait run key=value` uses the default config
    return find_config(config), overrides


def cmd_run(args) -> int:
    from .config import load_config
    from .run import execute

    if args.nproc is not None and args.nproc != 1:
        return _launch_torchrun(args)
    _watch_launcher()
    path, overrides = _split_config_arg(args)
    cfg = load_config(path, overrides)
    run = execute(cfg)
    if run.rank == 0:
        _print_report(run)
    return {"interrupted": 130, "diverged": 1}.get(run.status, 0)


def _launch_torchrun(args) -> int:
    """``plait run --nproc N …``: ``torchrun --standalone --nproc-per-node N -m plait run …`` (one node).

    The config is resolved and checked here first, so a schema error is one line from one process, not one per
    rank. torchrun's launcher runs in this process: when a rank fails (its own one-line error already printed),
    the exit status is that rank's (2 for bad input) and torchrun's ``ChildFailedError`` traceback and failure
    log are not shown unless ``--debug``.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if args.nproc < 1:
        raise PlaitError(f"--nproc: must be at least 1, got {args.nproc}")
    _, cfg, components = _validated(args)
    _check_nproc(args.nproc, components)
    debug = getattr(args, "debug", False)
    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    argv = [a for a in (args.config, *args.overrides) if a is not None]
    os.environ["PLAIT_LAUNCHER_PID"] = str(os.getpid())  # the ranks stop when this process dies (`_watch_launcher`)
    try:
        torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "plait",
                  *(["--debug"] if debug else []), "run", *argv])
    except ChildFailedError as exc:
        if debug:
            raise
        code = exc.get_first_failure()[1].exitcode
        if code in (130, -2):  # Ctrl-C: the ranks checkpointed and rank 0 printed the report
            return 130
        return code if code > 0 else 128 - code  # killed by signal -code
    except (KeyboardInterrupt, SignalException):  # Ctrl-C reached the launcher while it waited on the ranks
        if debug:
            raise
        return 130
    return 0


def _watch_launcher() -> None:
    """In a rank started by ``plait run --nproc N``: die with the launcher (no orphans after a SIGKILL of it).
    Linux: PR_SET_PDEATHSIG; elsewhere a daemon thread that polls the parent pid."""
    want = os.environ.get("PLAIT_LAUNCHER_PID")
    if not want or not want.isdigit() or os.getpid() == int(want):
        return
    import signal
    import threading

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:  # also covers a launcher that died before prctl ran, and non-Linux systems
        import time

        while True:
            if os.getppid() != parent or not _alive(int(want)):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, name="plait-launcher-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_nproc(nproc: int, components: dict) -> None:
    """Several processes need a ``parallel:`` strategy that splits the work: without one, or with ``single``,
    each rank would run its own complete, duplicate training."""
    from .config import parallel_choices
    from .manager import get_host

    if nproc <= 1:
        return
    recipe = components["recipe"]
    comp = components.get("parallel")
    if comp is not None and comp.entry.extra.get("max_world") != 1:
        return
    allowed = ", ".join(parallel_choices(recipe, get_host().registries, multi=True)) or "none"
    what = "has no 'parallel:' section" if comp is None else f"uses parallel {comp.entry.name!r} (one process)"
    raise ConfigError(f"--nproc {nproc}: the config {what}, so every rank would run the same training; add "
                      f"parallel.name=<strategy> (for recipe {recipe.entry.name!r}: {allowed}) or drop --nproc")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "inf" if v == float("inf") else f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def _print_report(run) -> None:
    """The end-of-run table: eval metrics before/after, the recipe's headline training metric, privacy (ε, δ,
    or that the guarantee is void), wall time and the newest checkpoint.

    A recipe names its headline metric by returning ``headline_metric`` in its result (default
    ``train/loss``); the value is the last logged one.
    """
    summary = run.summary
    print(f"run directory: {run.dir}  (tensorboard --logdir {run.dir})")
    before, after = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    for key in sorted(set(before) | set(after)):
        print(f"  {key:<28} before {_fmt(before.get(key)):>10}   after {_fmt(after.get(key)):>10}")
    final = summary.get("final") or {}
    headline = summary.get("headline_metric") or "train/loss"
    if headline in final:
        print(f"  {headline:<28} last   {_fmt(final[headline]):>10}")
    eps = summary.get("privacy/epsilon", final.get("privacy/epsilon"))
    if eps is not None:
        delta = summary.get("privacy/delta", final.get("privacy/delta"))
        line = f"  {'privacy':<28} ε {_fmt(eps)}  δ {_fmt(delta)}"
        print(line + ("   (infinite: no guarantee)" if eps == float("inf") else ""))
    if summary.get("privacy/guarantee") == "void":
        print(f"  privacy guarantee: VOID ({summary.get('privacy/void_reason', 'see summary.json')})")
    if summary.get("wall_seconds") is not None:
        print(f"  {'wall time':<28} {summary['wall_seconds']:.1f} s")
    latest = run.checkpointer.latest() if getattr(run, "checkpointer", None) is not None else None
    if latest is not None:
        print(f"  {'checkpoint':<28} {latest}")
    if run.status == "diverged":
        print(f"diverged at step {summary.get('diverged_at')}: a non-finite loss; the last good checkpoint is kept")
    if run.status == "interrupted":
        print(f"interrupted at step {summary.get('interrupted_at')}; continue with the same command plus "
              f"run.resume={run.dir}")


def _validated(args):
    """(path, resolved config, components) of a CONFIG + overrides command line, every section checked."""
    from .config import load_config, validate
    from .manager import get_host

    path, overrides = _split_config_arg(args)
    cfg = load_config(path, overrides)
    host = get_host()
    host.check_healthy()
    return path, cfg, validate(cfg, host.registries)


def cmd_validate(args) -> int:
    path, cfg, components = _validated(args)
    names = ", ".join(f"{s}={c.entry.name}" if not isinstance(c, list) else f"{s}=[{', '.join(x.entry.name for x in c)}]"
                      for s, c in components.items())
    print(f"{path}: valid ({names})")
    for section, comp in components.items():  # what an entry projects for this config (e.g. a DP run's ε)
        for c in comp if isinstance(comp, list) else [comp]:
            project = c.entry.extra.get("project")
            line = project(cfg=cfg, options=c.options) if callable(project) else None
            if line:
                print(f"  {section} {c.entry.name}: {line}")
    return 0


def cmd_config(args) -> int:
    from omegaconf import OmegaConf

    _, cfg, _ = _validated(args)
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def cmd_plugins(args) -> int:
    from .manager import get_host

    host = get_host()
    rows = [{"name": p.name, "version": p.version, "module": p.module, "builtin": p.builtin, "hooks": p.hooks}
            for p in host.plugins.values()]
    for name, err in host.failures.items():
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            rows.append({"name": name, "version": None, "module": None, "builtin": None, "hooks": [], "error": err})
        else:
            row["error"] = err
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if r["module"] is None:  # never loaded: say which plugin and why, on its line
            print(f"{r['name']}  FAILED: {r['error']}")
            continue
        status = f"  ERROR: {r['error']}" if "error" in r else ""
        print(f"{r['name']} {r['version'] or ''} ({r['module']}){status}")
        for h in r["hooks"]:
            print(f"    {h}")
    return 0


def hook_specs() -> list[tuple[str, str, str]]:
    """(name, signature, first doc line) of every hook spec."""
    out = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not hasattr(fn, "plait_spec"):
            continue
        doc = (inspect.getdoc(fn) or "").splitlines()
        out.append((name, f"{name}{inspect.signature(fn)}", doc[0] if doc else ""))
    return out


def cmd_hooks(args) -> int:
    for _, sig, first in hook_specs():
        print(f"{sig}\n    {first}")
    return 0


def cmd_ls(args) -> int:
    from .manager import get_host

    host = get_host()
    kinds = KINDS
    if args.kind:
        kind = KINDS_BY_NAME.get(args.kind) or KINDS_BY_SECTION.get(args.kind)
        if kind is None:
            raise PlaitError(f"unknown kind {args.kind!r}; allowed: "
                             f"{', '.join(k.name for k in KINDS)} (or their sections: "
                             f"{', '.join(k.section for k in KINDS)})")
        kinds = (kind,)
    rows = [{"kind": k.name, "section": k.section, "name": e.name, "plugin": e.plugin, "doc": e.doc,
             "config": e.config.__name__}
            for k in kinds for e in host.registries.by_kind[k.name].entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for k in kinds:
        entries = [r for r in rows if r["kind"] == k.name]
        print(f"{k.name} ({k.section}:)")
        for r in entries:
            print(f"  {r['name']:<24} {r['plugin']:<16} {r['doc']}")
        if not entries:
            print("  (none)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="Efficient and private training; every method a "
                                                               "plugin.")
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func, help_ in (("run", cmd_run, "compose and perform a run"),
                              ("validate", cmd_validate, "check a config against every schema"),
                              ("config", cmd_config, "print the resolved config")):
        p = sub.add_parser(name, help=help_)
        _compose_args(p)
        if name == "run":
            p.add_argument("--nproc", type=int, default=None, metavar="N",
                           help="run on N local processes through torchrun (for a parallel: strategy)")
        p.set_defaults(func=func)
    p = sub.add_parser("plugins", help="list loaded plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("hooks", help="list hook specs")
    p.set_defaults(func=cmd_hooks)
    p = sub.add_parser("ls", help="list registry entries")
    p.add_argument("kind", nargs="?", help="a kind (model_families) or its section (model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    return parser


def _add_plugin_commands(parser: argparse.ArgumentParser) -> None:
    from .manager import get_host

    host = get_host()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for impl in host.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(**{a: sub for a in impl.argnames})
        except Exception as exc:
            host.failures.setdefault(impl.plugin_name, f"plugin {impl.plugin_name!r} failed in register_commands: "
                                                        f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        if argv[:1] != ["--version"]:  # --help lists the plugins' commands too
            _add_plugin_commands(parser)
        args = parser.parse_args(argv)
        args.debug = debug  # `plait run --nproc N` hands it on to the ranks
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if args.func is not cmd_plugins:
            for name, err in _failures():
                print(f"plait: warning: {err}", file=sys.stderr)
        return int(args.func(args) or 0)
    except PlaitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `plait plugins --json | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141


def _failures():
    from .manager import get_host

    return list(get_host().failures.items())


if __name__ == "__main__":
    sys.exit(main())
