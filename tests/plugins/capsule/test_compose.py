"""``classify`` and ``depth`` on the shared first-order step (`plait.step.FirstOrderStep`): the step against a
hand-written loop, ``grad_transform:`` (SAM, flashdp, a SAM + flashdp chain) and ``transforms:`` (freeze), the
per-sample losses a private step sums, and what a private transform refuses (BatchNorm in the depth nets)."""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plait.config import load_config
from plait.errors import ConfigError
from plait.run import compose, execute

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "capsule"
TINY_CLASSIFY = ["data.num_images=120", "data.min_per_class=3", "recipe.batch_size=8", "run.log_every=1",
                 "run.progress=false", "model.base_dims=[8,8,8]", "model.heads=[1,1,2]", "run.eval_every=0"]
TINY_DEPTH = ["recipe.batch_size=2", "data.height=32", "data.width=48", "model.depth_width=8", "model.pose_width=8",
              "model.decoder_channels=[8,8,16,32]", "run.log_every=1", "run.progress=false", "run.eval_every=0",
              "recipe.log_images=false", "data.train_sequences=1", "data.test_sequences=1", "data.num_frames=6",
              "data.blur_subframes=1"]


def _recipe(tmp_path, config: str, overrides: list[str]):
    """(run, recipe) built from a config, nothing trained yet."""
    run = compose(load_config(CONFIGS / config, [f"run.out_dir={tmp_path}", *overrides]))
    return run, run.build("recipe", run=run)


def _train(run, recipe) -> dict:
    try:
        return recipe()
    finally:
        run.logger.close()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- classify against a hand-written loop --------------------------------------------------------------------
@pytest.mark.parametrize("loss,sampler", [("weighted_ce", "uniform"), ("focal", "weighted")])
def test_classify_without_transform_equals_a_hand_written_loop(tmp_path, fresh_host, loss, sampler):
    """AdamW with decay on matrices / conv kernels (not the position embedding) and none elsewhere, warm-up then
    cosine to 0 at run.steps, batches and flips/rotations from one generator seeded run.seed, standardised
    inputs, inverse-frequency class weights: 3 steps of the recipe equal this loop written from the formulas."""
    from plait.plugins.capsule.pit import build_pit

    fresh_host()
    T, W, lr, wd, B, seed = 6, 2, 2.0e-3, 0.05, 8, 0
    run, recipe = _recipe(tmp_path, "classify_pit.yaml", TINY_CLASSIFY + [
        f"run.steps={T}", f"recipe.warmup_steps={W}", f"recipe.lr={lr}", f"recipe.weight_decay={wd}",
        f"recipe.loss={loss}", f"recipe.sampler={sampler}", "recipe.focal_gamma=2.0", "recipe.augment=true"])
    data = recipe.data
    model = build_pit(image_size=32, num_classes=14, patch=4, stride=2, base_dims=[8, 8, 8], depth=[1, 2, 1],
                      heads=[1, 1, 2], seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), recipe.model.state_dict().values()))
    X, Y = data.train.x, data.train.y
    mean, std = X.mean((0, 2, 3), keepdim=True), X.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    counts = torch.bincount(Y, minlength=14).double().clamp_min(1)
    w = 1 / counts
    w = (w / w.mean()).float()
    p_sample = (1 / counts)[Y]
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n != "pos_embed"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 and n != "pos_embed")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for s in range(1, 4):
        lr_s = lr * (s / W if s <= W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))
        if sampler == "weighted":
            idx = torch.multinomial(p_sample, B, replacement=True, generator=gen)
        else:
            idx = torch.randint(len(Y), (B,), generator=gen)
        x, y = (X[idx] - mean) / std, Y[idx]
        k = int(torch.randint(4, (1,), generator=gen))
        x = torch.rot90(x, k, (2, 3))
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = model.train()(x)
        if loss == "focal":
            logp = F.log_softmax(logits, -1)[torch.arange(B), y]
            objective = (-(1 - logp.exp()) ** 2 * logp * w[y]).mean()
        else:
            objective = F.cross_entropy(logits, y, weight=w)
        for g in opt.param_groups:
            g["lr"] = lr_s
        opt.zero_grad()
        objective.backward()
        opt.step()
        metrics = recipe.train_step(s)
        assert metrics["train/lr"] == pytest.approx(lr_s, abs=1e-15)
        assert metrics["train/loss"] == pytest.approx(float(objective.detach()), rel=1e-6)
    run.logger.close()
    for (name, a), b in zip(model.named_parameters(), recipe.model.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7, msg=name)


# --- the per-sample losses a private step sums -----------------------------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "weighted_ce", "focal"])
def test_classify_sample_losses_are_the_class_weighted_per_example_losses(tmp_path, fresh_host, loss):
    """sample_losses = w_y·ℓ_i: their mean is the batch loss for ce and focal; for weighted_ce the batch loss is
    torch's weighted mean Σ w_y ℓ_i / Σ w_y. Both evaluations see the same (cached) augmented batch."""
    fresh_host()
    run, recipe = _recipe(tmp_path, "classify_pit.yaml", TINY_CLASSIFY + ["run.steps=2", f"recipe.loss={loss}",
                                                                          "recipe.label_smoothing=0.1"])
    run.logger.close()
    idx = recipe.batch_indices(1, 0)
    per, batch = recipe.sample_losses(idx), recipe.mean_loss(idx)
    assert per.shape == (len(idx),)
    y = recipe.data.train.y[idx]
    if loss == "weighted_ce":
        torch.testing.assert_close(per.sum() / recipe.weight[y].sum(), batch)
    else:
        torch.testing.assert_close(per.mean(), batch)


@pytest.mark.parametrize("config", ["depth_v2.yaml", "depth_vision_only.yaml"])
def test_depth_sample_losses_average_to_the_batch_loss(tmp_path, fresh_host, config):
    """Per snippet: photometric and smoothness over that snippet's pixels (+ its gyro term); the mean over the
    batch is the batch loss, computed with the same frames and the same auto-mask noise."""
    fresh_host()
    run, recipe = _recipe(tmp_path, config, TINY_DEPTH + ["run.steps=2", "recipe.batch_size=3"])
    run.logger.close()
    idx = recipe.batch_indices(1, 0)
    batch = recipe.mean_loss(idx)  # first evaluation: draws the noise; the second replays it
    per = recipe.sample_losses(idx)
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), batch, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(per, per.mean().expand(3))  # genuinely per snippet


# --- grad_transform: sam, and transforms: freeze ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config,overrides,frozen", [
    ("classify_pit.yaml", TINY_CLASSIFY, ["patch_embed.*", "stages.0.*"]),
    ("depth_v2.yaml", TINY_DEPTH, ["depth_encoder.*", "pose_net.fusion.*"]),
])
def test_sam_and_freeze_compose_with_both_recipes(tmp_path, fresh_host, config, overrides, frozen):
    """``grad_transform: sam`` takes every step's gradient at the perturbed point (its ascent counter equals the
    steps); ``transforms: [freeze]`` leaves the matched parameters where they started while the others move."""
    fresh_host()
    steps = 3
    pats = ", ".join(f"'{p}'" for p in frozen)
    run, recipe = _recipe(tmp_path, config, overrides + [
        f"run.steps={steps}", "grad_transform={name: sam, rho: 0.05}", f"transforms=[{{name: freeze, patterns: [{pats}]}}]"])
    before = _params(recipe.model)
    result = _train(run, recipe)
    assert result["sam/ascent_steps"] == steps
    is_frozen = {n: any(fnmatch.fnmatchcase(n, p) for p in frozen) for n in before}
    assert any(is_frozen.values()) and not all(is_frozen.values())
    after = dict(recipe.model.named_parameters())
    for n, p in after.items():
        if is_frozen[n]:
            assert not p.requires_grad and torch.equal(p.detach(), before[n]), n
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before if not is_frozen[n])
    rows = [r for r in _rows(run.dir) if "train/loss" in r]
    assert len(rows) == steps and all("sam/perturbed_loss" in r for r in rows)


def test_sam_ascent_sees_the_same_augmented_batch(tmp_path, fresh_host):
    """SAM recomputes the step's loss at w + e through the step's loss closure: the recipe hands back the same
    augmented batch instead of drawing new flips (and the generator advances as without SAM)."""
    fresh_host()
    common = TINY_CLASSIFY + ["run.steps=2"]
    run, recipe = _recipe(tmp_path / "a", "classify_pit.yaml", common + ["grad_transform={name: sam, rho: 0.0}"])
    run.logger.close()
    run_ref, ref = _recipe(tmp_path / "b", "classify_pit.yaml", common)
    run_ref.logger.close()
    for s in (1, 2):  # rho 0: the ascent point is w itself, so the step is plain AdamW on the same batch
        m, r = recipe.train_step(s), ref.train_step(s)
        assert m["sam/perturbed_loss"] == pytest.approx(m["train/loss"], rel=1e-6)
        assert m["train/loss"] == pytest.approx(r["train/loss"], rel=1e-6)
    assert torch.equal(recipe.gen.get_state(), ref.gen.get_state())
    for a, b in zip(recipe.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- flashdp ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("transform", ["{name: flashdp, noise_multiplier: 1.0}",
                                       "[{name: sam, rho: 0.05}, {name: flashdp, noise_multiplier: 1.0}]"])
def test_classify_with_flashdp_trains_and_reports_epsilon(tmp_path, fresh_host, transform):
    """A tiny PiT under flashdp (alone, and after SAM: DP-SAT): Poisson batches built and augmented by the recipe,
    ε finite in the logged metrics and the summary, the loss on a fixed batch moved; parameters flashdp froze
    (it reports them in dp/frozen) did not move."""
    fresh_host()
    steps = 3
    run, recipe = _recipe(tmp_path, "classify_pit.yaml", TINY_CLASSIFY + [
        f"run.steps={steps}", f"grad_transform={transform}", "recipe.loss=weighted_ce"])
    x = (recipe.data.train.x[:32] - recipe.mean) / recipe.std
    y = recipe.data.train.y[:32]

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(recipe.loss(recipe.model.eval()(x), y))

    before, loss0 = _params(recipe.model), fixed_loss()
    result = _train(run, recipe)
    assert math.isfinite(result["privacy/epsilon"]) and result["privacy/epsilon"] > 0
    assert result["privacy/steps"] == steps
    logged = [r["privacy/epsilon"] for r in _rows(run.dir) if "privacy/epsilon" in r]
    assert len(logged) == steps and all(math.isfinite(e) for e in logged) and logged == sorted(logged)
    loss1 = fixed_loss()
    assert math.isfinite(loss1) and loss1 != loss0
    after = dict(recipe.model.named_parameters())
    for n, p in after.items():
        if not p.requires_grad:  # frozen by flashdp (a layer without a DP version): unchanged
            assert torch.equal(p.detach(), before[n]), n
    assert any(not torch.equal(p.detach(), before[n]) for n, p in after.items() if p.requires_grad)
    if transform.startswith("["):
        assert result["sam/mode"] == "dp-sat"


def test_classify_refuses_the_weighted_sampler_under_poisson_sampling(tmp_path, fresh_host):
    fresh_host()
    with pytest.raises(ConfigError, match="recipe.sampler: 'weighted' does not apply under this grad_transform"):
        _recipe(tmp_path, "classify_pit.yaml", TINY_CLASSIFY + [
            "run.steps=2", "recipe.sampler=weighted", "grad_transform={name: flashdp, noise_multiplier: 1.0}"])


@pytest.mark.parametrize("name", ["flashdp", "dp_flat"])
@pytest.mark.parametrize("verb", ["validate", "run"])
def test_depth_with_a_private_transform_and_batchnorm_is_refused_at_validate(tmp_path, fresh_host, capsys, name,
                                                                              verb):
    """The depth and pose encoders normalise with BatchNorm by default (model.norm: batch): one snippet's loss
    depends on the others in its batch, so no per-sample gradient exists. ``plait validate`` (and ``plait run``,
    before anything is written) exits 2 with one line naming the section, BatchNorm and the fix."""
    from plait.cli import main

    fresh_host()
    capsys.readouterr()
    assert main([verb, str(CONFIGS / "depth_v2.yaml"), f"run.out_dir={tmp_path}", "run.steps=2", *TINY_DEPTH,
                 f"grad_transform={{name: {name}, noise_multiplier: 1.0}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: grad_transform: the private '{name}' needs per-sample"), err
    assert "BatchNorm" in err[0] and "model.norm=group" in err[0]
    assert not any(Path(tmp_path).iterdir())  # nothing written


@pytest.mark.parametrize("skip,missing", [("[]", "pose_net and vibration run twice"),
                                          ("['pose_net*']", "vibration runs twice")])
def test_depth_private_with_groupnorm_needs_the_twice_called_nets_skipped(tmp_path, fresh_host, capsys, skip,
                                                                         missing):
    """With norm: group the nets are per sample, but the pose net and the vibration branch run once per frame
    pair (twice per snippet) and the DP layers clip one call per step: refused at validate with the skip to set."""
    from plait.cli import main

    fresh_host()
    capsys.readouterr()
    assert main(["validate", str(CONFIGS / "depth_v2.yaml"), *TINY_DEPTH, "model.norm=group",
                 f"grad_transform={{name: flashdp, noise_multiplier: 1.0, skip: {skip}}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: grad_transform.skip: {missing} per snippet"), err
    assert "['pose_net*', 'vibration*']" in err[0]


def test_depth_norm_is_checked_at_validate(fresh_host, capsys):
    from plait.cli import main

    fresh_host()
    capsys.readouterr()
    assert main(["validate", str(CONFIGS / "depth_v2.yaml"), "model.norm=layer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.norm: 'layer' is not supported; allowed: batch, group" in err[0], err


def test_group_norm_nets_are_per_sample(fresh_host):
    """norm: group puts GroupNorm where BatchNorm was (same layer names, no BatchNorm left), and a sample's depth
    and pose no longer depend on the rest of its batch in training mode (they do with BatchNorm)."""
    from plait.plugins.capsule.depthnet import build_v2_sfmlearner

    kw = dict(height=32, width=48, depth_width=8, pose_width=8, depth_blocks=[1, 1], pose_blocks=[1, 1],
              decoder_channels=[8, 8, 16], imu_window=10, seed=0)
    bn, gn = build_v2_sfmlearner(**kw), build_v2_sfmlearner(norm="group", **kw)
    kinds = lambda m: {n: type(x).__name__ for n, x in m.named_modules() if "Norm" in type(x).__name__}  # noqa: E731
    assert set(kinds(bn)) == set(kinds(gn)) and set(kinds(bn).values()) == {"BatchNorm1d", "BatchNorm2d"}
    assert set(kinds(gn).values()) == {"GroupNorm"}
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 3, 32, 48, generator=g), torch.rand(4, 3, 32, 48, generator=g)
    imu = torch.randn(4, 6, 10, generator=g)
    for model, independent in ((gn, True), (bn, False)):
        model.train()
        full_d, full_p = model.depth(a).depth, model.pose_parameters(a, b, imu)[0]
        half_d, half_p = model.depth(a[:2]).depth, model.pose_parameters(a[:2], b[:2], imu[:2])[0]
        assert torch.allclose(full_d[:2], half_d, atol=1e-6) is independent
        assert torch.allclose(full_p[:2], half_p, atol=1e-7) is independent


DP_DEPTH = "{name: flashdp, target_epsilon: 8.0, delta: 1.0e-3, skip: ['pose_net*', 'vibration*']}"


@pytest.mark.slow
@pytest.mark.parametrize("chain", [DP_DEPTH, f"[{{name: sam, rho: 0.05}}, {DP_DEPTH}]"], ids=["dp", "dp_sat"])
def test_private_depth_with_group_norm_trains_the_depth_net_and_reports_epsilon(tmp_path, fresh_host, chain):
    """model.norm: group with flashdp (the pose net and vibration branch left out of DP), alone or after SAM
    (DP-SAT): the depth net's parameters move, the skipped nets are frozen (dp/frozen) and do not move, ε is
    finite and equals Opacus' RDP accountant's for the run's σ, q and steps (SAM's ascent reuses the previous
    privatized gradient, so it adds nothing); under DP-SAT every step after the first makes one ascent."""
    from opacus.accountants import RDPAccountant

    fresh_host()
    steps = 3
    run, recipe = _recipe(tmp_path, "depth_v2.yaml", TINY_DEPTH + [
        f"run.steps={steps}", "model.norm=group", f"grad_transform={chain}"])
    before = _params(recipe.model)
    result = _train(run, recipe)
    if "sam" in chain:
        assert result["sam/ascent_steps"] == steps - 1
    assert math.isfinite(result["privacy/epsilon"]) and result["privacy/epsilon"] <= 8.0 + 1e-6
    assert result["privacy/steps"] == steps
    ref = RDPAccountant()
    ref.history = [(result["privacy/noise_multiplier"], result["privacy/sample_rate"], steps)]
    assert result["privacy/epsilon"] == pytest.approx(ref.get_epsilon(1.0e-3), rel=1e-6)
    frozen = result["dp/frozen"]
    assert frozen and all(n.startswith(("pose_net", "vibration")) for n in frozen)
    after = dict(recipe.model.named_parameters())
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before if n.startswith("depth_"))
    for n in before:
        if n.startswith(("pose_net", "vibration")):
            assert torch.equal(after[n].detach(), before[n]), n
    rows = [r for r in _rows(run.dir) if "privacy/epsilon" in r]
    assert rows and all(math.isfinite(r["privacy/epsilon"]) for r in rows)


def test_depth_refuses_batchnorm_under_any_private_transform(tmp_path, fresh_host, monkeypatch):
    """The recipe's own check at build, for a private transform that does not refuse BatchNorm itself (validate's
    check switched off here to reach it)."""
    import plait.plugins.capsule as capsule
    from plait.plugins.flashdp.transform import FlashDP

    monkeypatch.setattr(capsule, "check_depth_components", lambda components: None)
    fresh_host()
    monkeypatch.setattr(FlashDP, "prepare", lambda self, model, **kw: model)
    with pytest.raises(ConfigError, match=r"grad_transform: model layer 'depth_encoder\.bn1' is a BatchNorm2d"):
        _recipe(tmp_path, "depth_v2.yaml", TINY_DEPTH + ["run.steps=2",
                                                         "grad_transform={name: flashdp, noise_multiplier: 1.0}"])


# --- depth: the LR schedule and old checkpoints ----------------------------------------------------------------
@pytest.mark.slow
def test_depth_checkpoint_with_steplr_state_resumes_exactly(tmp_path, fresh_host, monkeypatch):
    """Checkpoints written before the shared step held torch's StepLR state (``scheduler``) and an optimizer whose
    groups carry ``initial_lr``: they still load, the scheduler state is ignored, and the resumed steps repeat the
    uninterrupted run exactly (the LR is a function of the step: base LR for steps 1-3, × 0.1 from step 4)."""
    from plait.plugins.capsule.depth_recipe import DepthRecipe

    fresh_host()
    common = TINY_DEPTH + ["recipe.lr_step=3", f"run.out_dir={tmp_path}", "run.steps=5"]
    full = execute(load_config(CONFIGS / "depth_v2.yaml", common + ["run.name=full", "run.ckpt_every=0"]))
    new_format = DepthRecipe.state_dict

    def old_format(self):
        state = new_format(self)
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.cfg.lr_step, 0.1)
        for _ in range(2):
            opt.step()
            sched.step()
        state["scheduler"] = sched.state_dict()
        for group in state["optimizer"]["param_groups"]:
            group["initial_lr"] = self.cfg.lr
        return state

    monkeypatch.setattr(DepthRecipe, "state_dict", old_format)
    part = execute(load_config(CONFIGS / "depth_v2.yaml", common + ["run.name=part", "run.steps=2",
                                                                    "run.ckpt_every=2"]))
    monkeypatch.undo()
    resumed = execute(load_config(CONFIGS / "depth_v2.yaml", common + ["run.name=part", f"run.resume={part.dir}"]))
    assert resumed.status == "completed"

    def train(run_dir):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in _rows(run_dir)
                if "train/loss" in r}

    a, b = train(full.dir), train(part.dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert all(a[s] == b[s] for s in (3, 4, 5)), {s: (a[s], b[s]) for s in (3, 4, 5)}
    assert [a[s]["train/lr"] for s in (1, 2, 3, 4, 5)] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4], rel=1e-12)


def test_depth_refuses_a_negative_lr_step(tmp_path, fresh_host):
    fresh_host()
    with pytest.raises(ConfigError, match="recipe.lr_step: must be 0"):
        _recipe(tmp_path, "depth_v2.yaml", TINY_DEPTH + ["run.steps=2", "recipe.lr_step=-1"])
