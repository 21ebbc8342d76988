"""``transforms: [{name: wip_attention, calibrate: true}]`` in another recipe (sft on the bundled wip_lm and its
held-out text): the closed-form calibration of wip_recover runs on the run's own first training batch(es) inside
the first training forward, step 1's loss already uses the calibrated operator, the calibration is in the
checkpoint (a resumed run is exact and fits nothing again), ``calibrate: false`` is today's swap, and recipes
that cannot be calibrated this way (forward-only zo) are refused."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from plait.config import load_config
from plait.errors import ConfigError
from plait.run import compose, execute

MAX_LEN, BATCH, EVAL_N = 32, 4, 4
CONFIG = f"""
run: {{name: w, seed: 0, steps: 1, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: OUT, progress: false,
      device: cpu}}
recipe: {{name: sft, lr: 1.0e-3, batch_size: {BATCH}, max_length: {MAX_LEN}, eval_batch_size: 32,
         eval_examples: {EVAL_N}, max_grad_norm: 0}}
model: {{name: wip_lm}}
data: {{name: wip_heldout}}
transforms: [{{name: wip_attention, operator: minprod, calibrate: true}}]
"""


def _config(tmp_path: Path, overrides: list[str]):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("OUT", str(tmp_path / "runs")))
    return load_config(path, overrides)


def _recipe(tmp_path, overrides):
    run = compose(_config(tmp_path, overrides))
    return run, run.build("recipe", run=run)


@pytest.fixture(scope="module")
def reference():
    """Independent of the run: the bundled LM and tokenizer, the train split tokenized as sft does, and the
    batch order of the run's seed."""
    from plait.plugins.basics.parts import tokenize_split
    from plait.plugins.wip.lm import HeldoutText, load_lm
    from plait.step import BatchOrder

    model, tok = load_lm()
    items = tokenize_split(tok, HeldoutText().examples("train"), MAX_LEN)
    return model, tok, items, BatchOrder(len(items), BATCH, 0)


def _batch(reference, k: int) -> dict[str, torch.Tensor]:
    from plait.plugins.basics.data import collate

    _, tok, items, order = reference
    return collate([items[i] for i in order(k)], tok.pad_token_id)


def _swapped(reference):
    from plait.plugins.wip.attention import swap_attention

    return swap_attention(copy.deepcopy(reference[0]), "minprod")


@pytest.mark.parametrize("batches,accum", [(1, 1), (2, 2)])
def test_sft_trains_the_model_calibrated_on_its_own_first_batches(tmp_path, fresh_host, reference, batches, accum):
    from plait.plugins.wip.attention import operator_counts, wip_modules
    from plait.plugins.wip.recovery import calibrate

    fresh_host()
    run, recipe = _recipe(tmp_path, [f"recipe.grad_accum={accum}",
                                     f"transforms=[{{name: wip_attention, operator: minprod, calibrate: true, "
                                     f"calibrate_batches: {batches}}}]"])
    hook, wips = recipe.model.wip_calibration, wip_modules(recipe.model)
    assert hook.state == "pending" and operator_counts(recipe.model)["calls"] == 0
    recipe()  # run.steps = 1: the first evaluation, step 1, the final evaluation
    assert hook.state == "calibrated" and len(hook.used) == batches

    # the closed form of wip_recover on the same batches (step 1's micro-batches: order(0), order(1)), called
    # independently on a freshly swapped copy of the bundled LM
    used = [_batch(reference, k) for k in range(batches)]
    ref = _swapped(reference)
    calibrate(ref, used)
    for name in ("alpha", "beta", "gamma"):
        for got, want in zip(hook.fitted[name], (getattr(w, name) for w in wip_modules(ref))):
            assert torch.equal(got, want), name
    # after step 1 the parameters left their initial values (the fit, then one AdamW step)
    for w in wips:
        assert bool(w.calibrated) and not torch.allclose(w.alpha, torch.ones_like(w.alpha))
        assert not torch.allclose(w.beta, torch.zeros_like(w.beta))

    # step 1's logged loss: the last training forward(s) of step 1 ran the calibrated operator, the first
    # calibrate_batches - 1 the uncalibrated one (the token mean per micro-batch, averaged over grad_accum)
    plain = _swapped(reference).train()
    ref.train()
    with torch.no_grad():
        want = sum((ref if k == batches - 1 else plain)(**_batch(reference, k)).loss for k in range(accum)) / accum
    assert run.logger.last["train/loss"] == pytest.approx(float(want), rel=1e-5)

    # the operator ran: every layer on each training forward and on each evaluation batch (first and final)
    assert operator_counts(recipe.model)["calls"] == len(wips) * (accum + 2)
    assert operator_counts(recipe.model)["pairs"] > 0


def test_calibrate_false_keeps_the_uncalibrated_swap(tmp_path, fresh_host, reference):
    from plait.plugins.wip.attention import operator_counts, wip_modules

    fresh_host()
    run, recipe = _recipe(tmp_path, ["run.steps=2", "transforms=[{name: wip_attention, operator: minprod}]"])
    assert not hasattr(recipe.model, "wip_calibration") and not recipe.model._forward_pre_hooks
    recipe()
    for w in wip_modules(recipe.model):  # α, β, γ are not used uncalibrated: no gradient, never move
        assert not bool(w.calibrated)
        assert torch.equal(w.alpha, torch.ones_like(w.alpha)) and torch.equal(w.beta, torch.zeros_like(w.beta))
    assert operator_counts(recipe.model)["calls"] == len(wip_modules(recipe.model)) * 4
    # step 2's loss is the uncalibrated swapped model's after one step; step 1's (logged first) equals it at start
    rows = [line for line in (run.dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    import json

    first = next(json.loads(r) for r in rows if json.loads(r)["step"] == 1)
    with torch.no_grad():
        want = _swapped(reference).train()(**_batch(reference, 0)).loss
    assert first["train/loss"] == pytest.approx(float(want), rel=1e-5)


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    return load_file(str(last / "tensors.safetensors"))


def test_a_calibrated_run_resumes_exactly_without_calibrating_again(tmp_path, fresh_host, capsys):
    fresh_host()
    common = ["run.ckpt_every=2", "run.log_every=2"]
    whole = execute(_config(tmp_path, [*common, "run.name=whole", "run.steps=4"]))
    assert capsys.readouterr().err.count("wip_attention: calibrated") == 1
    part = execute(_config(tmp_path, [*common, "run.name=part", "run.steps=2"]))
    assert capsys.readouterr().err.count("wip_attention: calibrated") == 1
    resumed = execute(_config(tmp_path, [*common, "run.name=part", "run.steps=4", f"run.resume={part.dir}"]))
    assert capsys.readouterr().err.count("wip_attention: calibrated") == 0  # loaded, not fitted again
    assert resumed.dir == part.dir and resumed.status == "completed"
    a, b = _final_tensors(whole.dir), _final_tensors(part.dir)
    model_keys = [k for k in a if k.startswith("task/model/")]
    assert any(k.endswith("wip.alpha") for k in model_keys) and any(k.endswith("wip.calibrated") for k in model_keys)
    assert set(a) == set(b)
    for k in a:
        if k.startswith("rng/"):
            continue
        assert torch.equal(a[k], b[k]), k
    assert whole.summary["final_eval"] == resumed.summary["final_eval"]


def test_a_forward_only_recipe_is_refused_instead_of_training_uncalibrated(tmp_path, fresh_host):
    fresh_host()
    cfg = _config(tmp_path, ["recipe={name: zo, batch_size: 4, max_length: 32, eval_examples: 4}",
                             "perturbation={name: mezo, eps: 1.0e-3, lr: 1.0e-4}"])
    with pytest.raises(ConfigError, match="calibrate: true .* forward-only recipe such as zo"):
        execute(cfg)


def test_calibrate_batches_must_be_positive(fresh_host):
    entry = fresh_host().registries.model_transforms.get("wip_attention")
    with pytest.raises(ValueError, match="calibrate_batches must be at least 1"):
        entry.factory(operator="minprod", mixer="exact", key_bias=False, dim_scales=False, calibrate=True,
                      calibrate_batches=0)


def test_flashdp_is_refused_the_calibration_reads_private_data_outside_the_accountant(tmp_path, fresh_host):
    fresh_host()
    with pytest.raises(ConfigError, match="private training data outside the DP accountant"):
        execute(_config(tmp_path, ["grad_transform={name: flashdp, noise_multiplier: 1.0}"]))
