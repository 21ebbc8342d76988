"""Config composition: defaults ⊕ file (with base:) ⊕ dotlist, interpolation, schema validation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from plait.config import RunSection, load_config, validate
from plait.errors import ConfigError
from plait.registry import Registries


@dataclass
class ToyModel:
    width: int = 8
    act: str = "relu"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    path: str | None = None


@dataclass
class Floats:
    lr: float = 1e-3
    eps: float | None = None
    bound: float = field(default=1.0, metadata={"allow_inf": True})
    steps: int = 1


@dataclass
class NeedsPath:
    path: str = MISSING


def _registries():
    regs = Registries()
    regs.recipes.register("toy", lambda **kw: kw, config=ToyModel, plugin="t", requires=("model",))
    regs.model_families.register("toy-model", lambda **kw: kw, config=ToyModel, plugin="t")
    regs.datasets.register("needs-path", lambda **kw: kw, config=NeedsPath, plugin="t")
    regs.perturbations.register("floats", lambda **kw: kw, config=Floats, plugin="t")
    regs.model_transforms.register("noop", lambda **kw: (lambda m: m), plugin="t")
    return regs


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_file_dotlist(tmp_path):
    p = write(tmp_path, "c.yaml", "run: {steps: 7, name: file}\nrecipe: {name: toy}\nmodel: {name: toy-model, width: 3}\n")
    cfg = load_config(p, ["run.name=cli", "model.act=gelu"])
    assert cfg.run.steps == 7  # file over default
    assert cfg.run.name == "cli"  # dotlist over file
    assert cfg.run.seed == RunSection().seed  # default kept
    assert cfg.model.width == 3 and cfg.model.act == "gelu"


def test_delete_and_interpolation(tmp_path):
    p = write(tmp_path, "c.yaml", "run: {name: a, out_dir: '/x/${run.name}'}\nrecipe: {name: toy}\n"
                                  "model: {name: toy-model, width: 3}\n")
    cfg = load_config(p, ["~model.width", "run.name=b"])
    assert "width" not in cfg.model
    assert cfg.run.out_dir == "/x/b"  # interpolation resolved after overrides


def test_overrides_apply_in_command_line_order(tmp_path):
    """A delete before a set replaces a mapping (a set alone merges into it); a set before a delete is undone.
    Until deletions ran after all sets, ``~model.opts model.opts={…}`` silently kept no ``opts`` at all (the
    GPT-2 private-DDP test ran with dropout on that way)."""
    p = write(tmp_path, "c.yaml", "recipe: {name: toy}\nmodel: {name: toy-model, opts: {a: 1, b: 2}}\n")
    assert dict(load_config(p, ["model.opts={c: 3}"]).model.opts) == {"a": 1, "b": 2, "c": 3}  # deep merge
    assert dict(load_config(p, ["~model.opts", "model.opts={c: 3}"]).model.opts) == {"c": 3}
    assert "opts" not in load_config(p, ["model.opts={c: 3}", "~model.opts"]).model
    cfg = load_config(p, ["~model.opts", "model.opts={c: 3}", "~model.opts.c", "model.opts.d=4"])
    assert dict(cfg.model.opts) == {"d": 4}


def test_base_inheritance_chain(tmp_path):
    write(tmp_path, "a.yaml", "run: {steps: 1, seed: 5}\nrecipe: {name: toy}\nmodel: {name: toy-model, width: 1}\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/b.yaml", "base: ../a.yaml\nrun: {steps: 2}\n")
    c = write(tmp_path, "sub/c.yaml", "base: [b.yaml]\nmodel: {width: 3}\n")
    cfg = load_config(c)
    assert (cfg.run.steps, cfg.run.seed, cfg.model.width) == (2, 5, 3)
    assert "base" not in cfg


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_validate_fills_defaults_and_types(tmp_path):
    p = write(tmp_path, "c.yaml", "recipe: {name: toy}\nmodel: {name: toy-model, width: '5'}\n"
                                  "transforms: [{name: noop}]\n")
    cfg = load_config(p)
    comps = validate(cfg, _registries())
    assert comps["model"].options == ToyModel(width=5)
    assert comps["model"].kwargs() == {"width": 5, "act": "relu", "layers": [1, 2], "path": None}
    assert cfg.model.act == "relu"  # defaults written back into the resolved config
    assert [c.entry.name for c in comps["transforms"]] == ["noop"]


FL = "recipe: {name: toy}\nmodel: {name: toy-model}\nperturbation: {name: floats}\n"


@pytest.mark.parametrize("text,overrides,match", [
    ("recipe: {name: toy}\nmodel: {name: nope}\n", [], r"model.name: unknown model 'nope'; available: toy-model \(t\)"),
    ("recipe: {name: toy}\nmodel: {name: toy-model, depth: 2}\n", [], r"model.depth: unknown key .* allowed keys: width, act, layers, path"),
    ("recipe: {name: toy}\nmodel: {name: toy-model, width: wide}\n", [], r"model.width: .*Integer"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\ndata: {name: needs-path}\n", [], r"data.path: required value missing"),
    ("recipe: {name: toy}\n", [], r"model: missing; recipe 'toy' needs"),
    ("model: {name: toy-model}\n", [], r"recipe: missing"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\nbogus: {a: 1}\n", [], r"unknown section 'bogus'"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run.steps=-1"], r"run.steps: must be a non-negative"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run.device=tpu"], r"run.device"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run.bogus=1"], r"run.bogus"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["novalue"], r"key=value"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["~model.nothing"], r"no such key"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\ntransforms: {name: noop}\n", [], r"transforms: must be a list"),
    ("- a\n- b\n", [], r"must hold a mapping"),
    ("run: {steps: [\n", [], r"not valid YAML at line"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run.device=cuda:x"], r"run.device: 'cuda:x' is not a device"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run.seed=99999999999999999999"], r"run.seed: must be"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\n", ["run=3"], r"run: must be a mapping of run keys"),
    ("run: 3\nrecipe: {name: toy}\n", [], r"run: must be a mapping of run keys"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\ntransforms: [{name: noop}, {name: nope}]\n", [],
     r"transforms\[1\]\.name: unknown transforms 'nope'"),
    # issue 21 item 6: non-finite, absurd and non-integer values, non-mappings, duplicate keys
    (FL, ["perturbation.eps=inf"], r"perturbation.eps: must be a finite number, got 'inf'"),
    (FL, ["perturbation.lr=1e400"], r"perturbation.lr: must be a finite number, got inf"),
    (FL, ["perturbation.lr=nan"], r"perturbation.lr: must be a finite number"),
    (FL, ["perturbation.lr=-inf"], r"perturbation.lr: must be a finite number"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\nperturbation: {name: floats, lr: .nan}\n", [],
     r"perturbation.lr: must be a finite number"),
    (FL, ["perturbation.steps=1e23"], r"perturbation.steps: must be an integer, got 1e\+23"),
    (FL, ["perturbation.steps=2.5"], r"perturbation.steps: must be an integer, got 2.5"),
    (FL, ["run.steps=1e23"], r"run.steps: must be an integer, got 1e\+23"),
    ("run: {steps: 1e23}\n" + FL, [], r"run.steps: must be an integer, got '1e23'"),
    ("run: {steps: 3.0}\n" + FL, [], r"run.steps: must be an integer, got 3.0"),
    (FL, ["recipe=[1,2]"], r"recipe: must be a mapping with a 'name' key"),
    (FL, ["model=3"], r"model: must be a mapping with a 'name' key"),
    ("recipe: {name: toy}\nmodel: {name: toy-model, width: 3, width: 4}\n", [],
     r"duplicate key 'width' at line 2 \(first at line 2\)"),
    ("recipe: {name: toy}\nmodel: {name: toy-model}\nrecipe: {name: toy}\n", [],
     r"duplicate key 'recipe' at line 3 \(first at line 1\)"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, match):
    p = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError, match=match) as info:
        validate(load_config(p, overrides), _registries())
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_changing_an_entry_name_replaces_its_section(tmp_path):
    base = write(tmp_path, "a.yaml", "recipe: {name: toy}\nmodel: {name: toy-model, width: 3}\n"
                                     "data: {name: needs-path, path: x}\n")
    cfg = load_config(base, ["model.name=other", "model.act=tanh"])
    assert dict(cfg.model) == {"name": "other", "act": "tanh"}  # width belonged to toy-model
    child = write(tmp_path, "b.yaml", "base: a.yaml\ndata: {name: jsonl2, rows: 3}\n")
    assert dict(load_config(child).data) == {"name": "jsonl2", "rows": 3}
    assert load_config(base, ["data.path=y"]).data.path == "y"  # same name: merged


def test_run_keys_cannot_be_deleted(tmp_path):
    p = write(tmp_path, "c.yaml", "recipe: {name: toy}\n")
    with pytest.raises(ConfigError, match="cannot be deleted; set them instead"):
        load_config(p, ["~run.steps"])


def test_an_empty_run_section_means_the_defaults(tmp_path):
    p = write(tmp_path, "c.yaml", "run:\n  # steps: 3\nrecipe: {name: toy}\nmodel: {name: toy-model}\n")
    assert load_config(p).run.steps == RunSection().steps
    assert load_config(p, ["run=null"]).run.seed == RunSection().seed


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("recipe: {name: toy}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text") as info:
        load_config(p)
    assert "\n" not in str(info.value)


def test_a_section_the_recipe_does_not_use_is_refused(tmp_path):
    regs = _registries()
    regs.recipes.register("strict", lambda **kw: kw, plugin="t", requires=("model",), uses=("data",))
    regs.grad_transforms.register("g", lambda **kw: kw, plugin="t")
    ok = write(tmp_path, "ok.yaml", "recipe: {name: strict}\nmodel: {name: toy-model}\ndata: {name: needs-path, path: x}\n")
    assert set(validate(load_config(ok), regs)) == {"recipe", "model", "data"}  # declared: accepted
    bad = write(tmp_path, "bad.yaml", "recipe: {name: strict}\nmodel: {name: toy-model}\ngrad_transform: {name: g}\n")
    with pytest.raises(ConfigError, match=r"grad_transform: recipe 'strict' does not use a 'grad_transform:' section "
                                          r"\(its sections: model, data\); remove it \(~grad_transform\)"):
        validate(load_config(bad), regs)
    # a recipe that declares no ``uses`` (an older third-party one) is not checked
    legacy = write(tmp_path, "legacy.yaml", "recipe: {name: toy}\nmodel: {name: toy-model}\ngrad_transform: {name: g}\n")
    assert "grad_transform" in validate(load_config(legacy), regs)


def test_every_shipped_recipe_declares_the_sections_it_uses(fresh_host):
    host = fresh_host()
    for entry in host.registries.recipes.entries():
        if entry.plugin in {"basics", "zo2", "flashdp", "infinite_sampling", "sam_if", "capsule", "wip", "distzo2"}:
            assert entry.extra.get("uses") is not None, entry.name


@pytest.mark.parametrize("override,match", [
    ("model.arch=gpt9", "model 'hf_causal_lm': unknown arch 'gpt9'; allowed: opt, qwen3, llama, gpt2"),
    ("model.size=huge", "model 'hf_causal_lm': unknown size 'huge' for arch 'opt'"),
    ("model.path=/nonexistent/model", "model 'hf_causal_lm': model path does not exist: /nonexistent/model"),
    ("grad_transform={name: flashdp, noise_multiplier: 0}", "noise_multiplier 0 gives no privacy"),
    ("grad_transform={name: dp_flat, noise_multiplier: 1.0, max_grad_norm: 0}", "max_grad_norm must be > 0"),
    ("grad_transform=[{name: sam}, {name: flashdp}]", r"grad_transform\[1\] 'flashdp': grad_transform: give exactly "
                                                      "one of noise_multiplier and target_epsilon"),
    ("grad_transform=[{name: sam, rho: -1}]", r"grad_transform\[0\] 'sam': rho must be >= 0"),
])
def test_validate_performs_the_builders_checks_without_building(override, match, fresh_host, capsys):
    """`plait validate` refuses what building the run would refuse (one line, exit 2), before any model exists."""
    from plait.cli import main

    fresh_host()
    assert main(["validate", "basics/sft_quickstart", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_an_allowed_inf_and_finite_floats_pass(tmp_path):
    p = write(tmp_path, "c.yaml", FL)
    comps = validate(load_config(p, ["perturbation.bound=inf", "perturbation.lr=1e-300", "run.steps=10"]),
                     _registries())
    assert comps["perturbation"].options.bound == float("inf") and comps["perturbation"].options.lr == 1e-300
