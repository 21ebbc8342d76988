"""Recipe ``grpo`` on the shared first-order step (`plait.step.FirstOrderStep`): one policy update against a
hand-written reference (the loss from `grpo_loss`'s documented formula, clipping and AdamW by torch directly), the
privacy unit of DP GRPO (one prompt: its G rollouts in one packed row, so a per-sample gradient is a per-prompt
gradient), and the grad transforms it now accepts (flashdp / dp_flat, sam) and refuses."""
from __future__ import annotations

import copy
import json
import math
import sys
import textwrap

import pytest
import torch

from plait.cli import main
from plait.config import load_config
from plait.run import compose, execute

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CFG = """
run: {{name: g, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false, keep_checkpoints: 0, device: cpu}}
recipe:
  name: grpo
  group_size: {G}
  prompts_per_step: {B}
  max_new_tokens: 2
  lr: 1.0e-2
  rewards: {rewards}
model: {model}
data: {{name: addition}}
sampler: {{name: continuous, g: {G}}}
"""
OPT = '{name: hf_causal_lm, path: "bundled:tiny-opt-base"}'
GPT2_F64 = "{name: hf_causal_lm, arch: gpt2, size: tiny, dtype: float64}"  # random init: varied completions
ADDITION_REWARDS = '[{name: exact_match}, {name: regex, pattern: "[0-9]", weight: 0.2}]'
DP = "{name: flashdp, noise_multiplier: 1.0, delta: 1.0e-3}"


@pytest.fixture
def hash_reward(tmp_path, monkeypatch) -> str:
    """A deterministic reward that varies between completions (a random-init model's text): rewards differ within
    every group, so every advantage is nonzero."""
    (tmp_path / "grpo_compose_rewards.py").write_text(textwrap.dedent("""
        def hashed(prompts, completions, **fields):
            return [float(sum(map(ord, c)) % 7) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grpo_compose_rewards", None)
    return "[{name: python, path: 'grpo_compose_rewards:hashed'}]"


def _cfg(tmp_path, steps=1, G=4, B=3, model=OPT, rewards=ADDITION_REWARDS):
    p = tmp_path / "c.yaml"
    p.write_text(CFG.format(steps=steps, out=tmp_path / "runs", G=G, B=B, model=model, rewards=rewards))
    return p


def _recipe(tmp_path, fresh_host, overrides=(), **kw):
    """The recipe of a composed run, built in-process (no step run yet)."""
    fresh_host()
    run = compose(load_config(_cfg(tmp_path, **kw), list(overrides)))
    return run.build("recipe", run=run)


def _capture_rollouts(recipe) -> list:
    """Record what the sampler returns (the rollouts the step trains on)."""
    seen, generate = [], recipe.sampler.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        seen.append(out)
        return out

    recipe.sampler.generate = recording
    return seen


def _hand_logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Log-probs of the completion tokens, from one unpadded forward of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]]


def _hand_prompt_losses(model, recipe, rollouts, eps_low=0.2, eps_high=0.2) -> list[torch.Tensor]:
    """grpo_loss's documented formula for μ = 1, β = 0, aggregation "grpo", scale "group", written out: rewards
    of the decoded completions, A_i = (r_i - mean) / (std_unbiased + 1e-4) per group, ρ = exp(logp - old) with old =
    logp (no grad), l = -min(ρA, clip(ρ, 1-ε_low, 1+ε_high) A), each completion's token mean, then each prompt's
    mean over its G completions (the batch loss is the mean over prompts)."""
    fn = recipe.fns[0]
    losses = []
    for prompt, group in zip(rollouts.prompt_ids, rollouts.completions):
        texts = [recipe.tok.decode(c[:-1] if c and c[-1] == recipe.eos_id else c, skip_special_tokens=True)
                 for c in group]
        r = torch.tensor(fn([""] * len(texts), texts), dtype=torch.float32)  # the recipe keeps rewards in fp32
        adv = ((r - r.mean()) / (r.std() + 1e-4)).double()
        per_completion = []
        for a, c in zip(adv, group):
            logp = _hand_logp(model, prompt, c)
            ratio = torch.exp(logp - logp.detach())
            tokens = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
            per_completion.append(tokens.mean())
        losses.append(torch.stack(per_completion).mean())
    return losses


def _adamw_step(model, lr, weight_decay=0.0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    opt.step()


def test_one_update_without_a_transform_equals_a_hand_written_reference(tmp_path, fresh_host, hash_reward):
    recipe = _recipe(tmp_path, fresh_host, ["recipe.weight_decay=0.01", "recipe.max_grad_norm=0.5"],
                     model=GPT2_F64, rewards=hash_reward)
    ref = copy.deepcopy(recipe.model).eval()
    before = [p.detach().clone() for p in recipe.model.parameters()]
    rollouts = _capture_rollouts(recipe)
    metrics = recipe.train_step(1)
    assert len(rollouts) == 1 and len(rollouts[0].prompt_ids) == 3
    losses = _hand_prompt_losses(ref, recipe, rollouts[0])
    loss = torch.stack(losses).mean()
    loss.backward()
    params = [p for p in ref.parameters() if p.requires_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm > 0.5  # the clip is active
    for p in params:
        p.grad.mul_(0.5 / (norm + 1e-6))
    _adamw_step(ref, lr=1.0e-2, weight_decay=0.01)
    assert metrics["train/loss"] == pytest.approx(float(loss.detach()), abs=1e-12)
    assert metrics["train/grad_norm"] == pytest.approx(float(norm), rel=1e-9)
    for (name, p), q, w in zip(recipe.model.named_parameters(), ref.parameters(), before):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10, msg=name)
        assert not torch.equal(p.detach(), w), name  # every tensor moved (AdamW's first step: ~lr per coordinate)


def test_packed_rows_give_the_unpacked_log_probs(tmp_path, fresh_host, hash_reward):
    from plait.plugins.infinite_sampling.logprobs import completion_logp, pack_groups, packed_logp

    recipe = _recipe(tmp_path, fresh_host, model=GPT2_F64, rewards=hash_reward)
    rollouts = recipe.sampler.generate(recipe.model, recipe.train_prompts[:3], group_size=4, max_new_tokens=5,
                                       step=1, eos_id=recipe.eos_id, pad_id=recipe.pad_id)
    seqs = rollouts.sequences(recipe.pad_id)
    with torch.no_grad():
        want, mask = completion_logp(recipe.model, seqs)
        got = packed_logp(recipe.model, pack_groups(seqs, 4))
    assert mask.sum() > 0
    torch.testing.assert_close(got * mask, want * mask, rtol=0, atol=1e-12)


def test_the_privacy_unit_is_one_prompt(tmp_path, fresh_host, hash_reward):
    """DP with σ = 0 and a threshold no gradient reaches: each clip group's per-sample norms are the norms of each
    prompt's gradient (one per sampled prompt, not one per rollout), and the update is AdamW on Σ_p ∇L_p / E[B]
    (E[B] = prompts_per_step, the accountant's q = B / N with N the train prompts)."""
    dp = "{name: flashdp, noise_multiplier: 0.0, allow_no_privacy: true, max_grad_norm: 1.0e6, delta: 1.0e-3}"
    recipe = _recipe(tmp_path, fresh_host, [f"grad_transform={dp}"], B=8, model=GPT2_F64, rewards=hash_reward)
    ref = _plain_gpt2(recipe.model)
    flashdp = recipe.grad_transform.members[0]
    assert flashdp.q == pytest.approx(8 / len(recipe.train_prompts))
    rollouts = _capture_rollouts(recipe)
    captured = {}
    call = flashdp.__call__

    def keep_norms(model, step):  # the per-sample norms of each clip group, before the transform clears them
        captured.update({g.name: flashdp.ctx.last_norms[g.index].clone() for g in flashdp.groups
                         if g.index in flashdp.ctx.last_norms})
        return call(model, step)

    flashdp.__call__ = keep_norms  # TransformChain looks the hook up on the instance
    metrics = recipe.train_step(1)
    sampled = int(metrics["train/prompts"])
    assert sampled == sum(len(r.prompt_ids) for r in rollouts) and sampled >= 2  # one call per prompt under DP
    losses = _hand_prompt_losses(ref, recipe, _merged(rollouts))
    per_prompt = []
    for loss in losses:
        ref.zero_grad(set_to_none=True)
        loss.backward()
        per_prompt.append({n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.requires_grad})
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight"):
        want = torch.stack([torch.linalg.vector_norm(g[name]) for g in per_prompt])
        assert captured[name].shape == (sampled,)
        torch.testing.assert_close(captured[name].double(), want, rtol=1e-7, atol=1e-12)
    for n, p in ref.named_parameters():
        p.grad = sum(g[n] for g in per_prompt) / 8
    _adamw_step(ref, lr=1.0e-2)
    for (name, p), q in zip(recipe.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-9, msg=name)


def _plain_gpt2(model):
    """A plain (not DP-wrapped) copy of the random-init tiny GPT-2 with ``model``'s weights."""
    from plait.plugins.basics.models import build_causal_lm

    plain, _ = build_causal_lm(arch="gpt2", size="tiny", dtype="float64")
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def _merged(parts):
    from plait.plugins.infinite_sampling.rollout import merge_rollouts

    return merge_rollouts(parts)


def test_private_rollouts_do_not_depend_on_the_other_sampled_prompts(tmp_path, fresh_host, hash_reward):
    recipe = _recipe(tmp_path, fresh_host, [f"grad_transform={DP}"], model=GPT2_F64, rewards=hash_reward)
    ex, pr = recipe.train_examples, recipe.train_prompts
    alone = recipe._generate([pr[5]], [ex[5]], 3, None)
    together = recipe._generate([pr[1], pr[5]], [ex[1], ex[5]], 3, None)
    assert together.completions[1] == alone.completions[0]


def _rows(run):
    return [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def test_dp_grpo_on_addition_logs_a_finite_epsilon_and_rewards(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(_cfg(tmp_path, steps=3, G=4, B=4), [f"grad_transform={DP}"]))
    assert run.status == "completed"
    rows = [r for r in _rows(run) if "privacy/epsilon" in r]  # every step is logged (the last one's eval apart)
    assert len(rows) == 3
    eps = [r["privacy/epsilon"] for r in rows]
    assert all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(eps)
    summary = json.loads((run.dir / "summary.json").read_text())
    assert math.isfinite(summary["privacy/epsilon"]) and summary["privacy/steps"] == 3
    assert summary["privacy/sample_rate"] == pytest.approx(4 / 44)  # prompts sampled out of the train prompts
    trained = [r for r in rows if "train/reward_mean" in r]  # a Poisson batch may be empty
    assert trained and all("train/reward_std" in r and "dp/clipped_fraction" in r for r in trained)
    assert all(math.isfinite(r["train/loss"]) for r in trained)


def test_dp_grpo_resume_is_exact(tmp_path, fresh_host):
    """The accountant and the noise / sampling seed are in the checkpoint (``reproducible_noise`` takes that seed
    from run.seed, so that two separate runs can be compared at all)."""
    from safetensors.torch import load_file

    def final(run):
        ck = sorted((run.dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
        return load_file(str(ck))

    dp = ["grad_transform={name: flashdp, noise_multiplier: 1.0, delta: 1.0e-3, reproducible_noise: true}"]
    fresh_host()
    full = execute(load_config(_cfg(tmp_path, steps=3), dp + ["run.name=full"]))
    fresh_host()
    part = execute(load_config(_cfg(tmp_path, steps=2), dp + ["run.name=part", "run.ckpt_every=1"]))
    fresh_host()
    resumed = execute(load_config(_cfg(tmp_path, steps=3), dp + ["run.name=part", f"run.resume={part.dir}"]))
    assert resumed.dir == part.dir
    a, b = final(full), final(part)
    model = [k for k in a if "/model/" in k]
    assert model and all(torch.equal(a[k], b[k]) for k in model)
    eps = [json.loads((r.dir / "summary.json").read_text())["privacy/epsilon"] for r in (full, part)]
    assert eps[0] == eps[1] and math.isfinite(eps[0])  # the accountant resumed with the 2 steps it had counted


def test_sam_runs_and_counts_an_ascent_per_update(tmp_path, fresh_host, hash_reward):
    """μ = 2 updates per step and the loss in micro-batches: SAM's ascent re-runs the micro-batched loss."""
    fresh_host()
    run = execute(load_config(_cfg(tmp_path, steps=3, model=GPT2_F64.replace("float64", "float32"),
                                   rewards=hash_reward), [
        "grad_transform={name: sam, rho: 0.05}", "recipe.num_iterations=2", "recipe.micro_batch_size=5",
        "recipe.warmup_sft_steps=3"]))
    assert run.status == "completed"
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["sam/ascent_steps"] == 6 and summary["sam/mode"] == "sam"
    rows = [r for r in _rows(run) if "train/reward_mean" in r]
    assert len(rows) == 3 and all(r["sam/perturbation_norm"] > 0 for r in rows)


@pytest.mark.parametrize("override,match", [
    ("recipe.warmup_sft_steps=5", "recipe.warmup_sft_steps: 5 supervised steps train on the private prompts"),
    ("recipe.num_iterations=2", "recipe.num_iterations: 2 updates on one Poisson-sampled batch"),
    ("recipe.micro_batch_size=4", "recipe.micro_batch_size: 4; under DP the step's loss is one forward"),
    ("recipe.aggregation=dapo", "recipe.aggregation: 'dapo' divides by the batch's total token count"),
    ("recipe.advantage_scale=batch", "recipe.advantage_scale: 'batch' scales every advantage"),
    ("recipe.predictor=running_mean", "recipe.predictor: 'running_mean' learns from the private prompts"),
])
def test_what_dp_grpo_cannot_compose_with_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    fresh_host()
    assert main(["run", str(_cfg(tmp_path)), f"grad_transform={DP}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and match in err and "with a private grad_transform" in err, err
    assert not list((tmp_path / "runs").glob("*/*"))


def test_dp_sat_grpo_counts_ascents_and_spends_dp_sgds_epsilon(tmp_path, fresh_host, hash_reward):
    """``grad_transform: [sam, flashdp]`` under grpo is DP-SAT (Park et al., 2023): from step 2 on, each update's
    gradient is taken at w + ρ ĝ_{t-1}/‖ĝ_{t-1}‖ (one ascent per step after the first, a nonzero perturbation
    logged), the batch is read once, by flashdp, so ε is the RDP accountant's for flashdp's σ, q and steps alone
    (Opacus' accountant as the reference), finite."""
    from opacus.accountants import RDPAccountant

    fresh_host()
    steps, delta = 3, 1.0e-3
    run = execute(load_config(_cfg(tmp_path, steps=steps, G=4, B=4, model=GPT2_F64.replace("float64", "float32"),
                                   rewards=hash_reward), [f"grad_transform=[{{name: sam, rho: 0.05}}, {DP}]"]))
    assert run.status == "completed"
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["sam/mode"] == "dp-sat" and summary["sam/ascent_steps"] == steps - 1
    rows = {r["step"]: r for r in _rows(run) if "privacy/epsilon" in r}
    assert sorted(rows) == [1, 2, 3]
    assert rows[1]["sam/perturbation_norm"] == 0.0  # no ĝ_0: step 1 is a DP-SGD step
    assert all(rows[s]["sam/perturbation_norm"] > 0 for s in (2, 3))
    assert summary["privacy/noise_multiplier"] == 1.0 and summary["privacy/steps"] == steps
    q = summary["privacy/sample_rate"]
    assert q == pytest.approx(4 / 44)
    ref = RDPAccountant()
    ref.history = [(1.0, q, steps)]
    assert math.isfinite(summary["privacy/epsilon"])
    assert summary["privacy/epsilon"] == pytest.approx(ref.get_epsilon(delta), rel=1e-6)
    trained = [r for r in rows.values() if "train/loss" in r]
    assert trained and all(math.isfinite(r["train/loss"]) for r in trained)
