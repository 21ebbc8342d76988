"""Samplers of the infinite_sampling plugin on tiny random HF models: slot KV cache vs plain forward, decode steps
and live KV against the analytic formulas (EOS forced at scripted lengths), same tokens from every scheduler."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.infinite_sampling.kv_cache import SlotKVCache, kv_bytes_per_token, prefill
from plait.plugins.infinite_sampling.samplers import (
    ContinuousScheduler,
    FullGroupScheduler,
    LengthAwareScheduler,
    MicroGroupScheduler,
    sample_seed,
)
from plait.plugins.infinite_sampling.schedule import FifoDispatcher, PlannedDispatcher, simulate_barrier, simulate_slots

MAX_NEW = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is ~10x faster than two contended ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model, tok = build_causal_lm(arch="qwen3", size="tiny")
    return model.eval(), tok


def scripted(B, G, seed=0):
    """Forced lengths in [1, MAX_NEW] per (prompt, sample)."""
    g = torch.Generator().manual_seed(seed)
    return {(b, i): int(torch.randint(1, MAX_NEW + 1, (), generator=g)) for b in range(B) for i in range(G)}


def run(sched, lm, prompts, G, forced=None, sampling=None, step=7, **kw):
    model, tok = lm
    return sched.generate(model, prompts, G, MAX_NEW, step=step, sampling=sampling or {"greedy": True},
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, forced_lengths=forced, **kw)


@pytest.mark.parametrize("arch", ["opt", "qwen3", "llama"])
def test_slot_cache_logits_equal_a_plain_forward(arch):
    torch.manual_seed(0)
    model, _ = build_causal_lm(arch=arch, size="tiny")
    model.eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]
    with torch.no_grad():
        refs = [model(torch.tensor([s])).logits[0].float() for s in seqs]
    cache = SlotKVCache(model, rows=3, capacity=12)
    p0, p1 = prefill(model, seqs[0][:3]), prefill(model, seqs[1][:5])
    cache.fill(0, p0)
    cache.fill(2, p1)  # row 1 stays empty; rows hold different lengths
    torch.testing.assert_close(p0.last_logits, refs[0][2], atol=1e-5, rtol=0)
    for t in range(2):
        out = cache.decode(model, [seqs[0][3 + t], 0, seqs[1][5 + t]], [True, False, True])
        torch.testing.assert_close(out[0], refs[0][3 + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[2], refs[1][5 + t], atol=1e-5, rtol=0)
    cache.release(2)
    out = cache.decode(model, [seqs[0][5], 0, 0], [True, False, False])  # one row decodes, others sit out
    torch.testing.assert_close(out[0], refs[0][5], atol=1e-5, rtol=0)
    assert cache.live_bytes() == 6 * kv_bytes_per_token(model)
    cache.fill(2, p0)  # refill an evicted row with a copy of a shared prompt KV
    out = cache.decode(model, [0, 0, seqs[0][3]], [False, False, True])
    torch.testing.assert_close(out[2], refs[0][3], atol=1e-5, rtol=0)


def test_decode_steps_and_live_kv_match_the_formulas(lm):
    model, _ = lm
    bpt = kv_bytes_per_token(model)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    B, G, g = 2, 5, 2
    forced = scripted(B, G)
    L = [[forced[(b, i)] for i in range(G)] for b in range(B)]
    P = [len(p) for p in prompts]

    full = run(FullGroupScheduler(), lm, prompts, G, forced)
    assert full.lengths == L
    assert full.stats.decode_steps == max(L[0]) + max(L[1])
    sim = simulate_barrier(L, P)
    assert full.stats.live_kv_trace == [t * bpt for t in sim.live_tokens]
    assert full.stats.peak_kv_bytes == max(G * (P[b] + max(L[b]) - 1) for b in range(B)) * bpt

    micro = run(MicroGroupScheduler(g=g), lm, prompts, G, forced)
    rounds = [L[b][k:k + g] for b in range(B) for k in range(0, G, g)]
    assert micro.stats.decode_steps == sum(max(r) for r in rounds)
    sim = simulate_barrier(rounds, [P[b] for b in range(B) for _ in range(0, G, g)])
    assert micro.stats.live_kv_trace == [t * bpt for t in sim.live_tokens]

    jobs = [(b, i) for b in range(B) for i in range(G)]
    plen = {j: P[j[0]] for j in jobs}
    cont = run(ContinuousScheduler(g=g), lm, prompts, G, forced)
    sim = simulate_slots(forced, g, FifoDispatcher(jobs), plen)
    assert cont.stats.decode_steps == sim.steps
    assert cont.stats.live_kv_trace == [t * bpt for t in sim.live_tokens]

    pred = [forced[j] for j in jobs]
    la = run(LengthAwareScheduler(g=g), lm, prompts, G, forced, predicted_lengths=pred)
    sim = simulate_slots(forced, g, PlannedDispatcher(jobs, pred, g), plen)
    assert la.stats.decode_steps == sim.steps
    assert la.stats.live_kv_trace == [t * bpt for t in sim.live_tokens]
    assert la.stats.decode_steps <= cont.stats.decode_steps <= micro.stats.decode_steps
    for r in (full, micro, cont, la):
        assert r.stats.tokens_generated == sum(map(sum, L))


@pytest.mark.parametrize("G", [2, 4, 8])
def test_peak_kv_of_micro_and_continuous_is_bounded_by_g_whatever_G(lm, G):
    model, _ = lm
    bpt, g, prompts = kv_bytes_per_token(model), 2, [[5, 6, 7], [8, 9, 10]]
    forced = {(b, i): MAX_NEW if i == G - 1 else 1 + i % 3 for b in range(2) for i in range(G)}
    bound = g * (3 + MAX_NEW) * bpt
    for sched in (MicroGroupScheduler(g=g), ContinuousScheduler(g=g)):
        r = run(sched, lm, prompts, G, forced)
        assert r.stats.peak_kv_bytes <= bound
        assert r.stats.peak_allocated_kv_bytes <= g * (3 + MAX_NEW) * bpt  # capacity + scratch column
    full = run(FullGroupScheduler(), lm, prompts, G, forced)
    assert full.stats.peak_kv_bytes == G * (3 + MAX_NEW - 1) * bpt


@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 1.0, "top_k": 50}],
                         ids=["greedy", "seeded"])
def test_every_scheduler_returns_the_same_tokens(lm, sampling):
    prompts = [[5, 6, 7, 8], [30, 31], [40, 41, 42, 43, 44]]
    G = 4
    results = [run(s, lm, prompts, G, sampling=sampling, predicted_lengths=[MAX_NEW - i % 3 for i in range(12)])
               for s in (FullGroupScheduler(), MicroGroupScheduler(g=3), ContinuousScheduler(g=3),
                         LengthAwareScheduler(g=2), ContinuousScheduler(g=2, share_prompt_kv=False))]
    for r in results[1:]:
        assert r.completions == results[0].completions and r.lengths == results[0].lengths
    if not sampling.get("greedy"):  # samples of one prompt differ; another step gives other samples
        assert len({tuple(c) for c in results[0].completions[0]}) > 1
        other = run(ContinuousScheduler(g=2), lm, prompts, G, sampling=sampling, step=8)
        assert other.completions != results[0].completions


def test_rollouts_sequences_layout(lm):
    _, tok = lm
    r = run(ContinuousScheduler(g=2), lm, [[5, 6, 7], [8]], 2, forced={(0, 0): 2, (0, 1): 1, (1, 0): 3, (1, 1): 1})
    s = r.sequences(tok.pad_token_id)
    assert s["input_ids"].shape == (4, 5) and s["prompt_index"].tolist() == [0, 0, 1, 1]
    assert s["completion_mask"].sum(1).tolist() == [2, 1, 3, 1]
    assert s["input_ids"][2, :4].tolist() == [8] + r.completions[1][0]
    assert r.completions[0][0][-1] == tok.eos_token_id and r.truncated == [[False, False], [False, False]]
    assert sample_seed(0, 1, 2, 3) != sample_seed(0, 1, 3, 2)


@pytest.mark.parametrize("make,args,match", [
    (lambda: MicroGroupScheduler(g=8), dict(G=4), "exceeds group_size"),
    (lambda: ContinuousScheduler(g=5), dict(G=4), "exceeds group_size"),
    (lambda: FullGroupScheduler(), dict(G=1), "group_size must be >= 2"),
    (lambda: ContinuousScheduler(g=2), dict(max_new=0), "max_new_tokens must be >= 1"),
    (lambda: ContinuousScheduler(g=2, cache_capacity=4), dict(prompts=[[1, 2, 3, 4, 5]]), "longer than cache"),
    (lambda: MicroGroupScheduler(g=2, cache_capacity=8), dict(prompts=[[1, 2, 3]]), "cache positions"),
    (lambda: FullGroupScheduler(), dict(prompts=[[]]), "prompt 0 is empty"),
    (lambda: LengthAwareScheduler(g=2), dict(pred=[1, 2, 3]), "predicted_lengths has 3 values"),
    (lambda: LengthAwareScheduler(g=2, fptas_eps=0), dict(), "fptas_eps"),
    (lambda: LengthAwareScheduler(g=2, max_states=-5), dict(), "max_states must be >= 0"),
])
def test_bad_input_raises_one_line_value_errors(lm, make, args, match):
    model, tok = lm
    with pytest.raises(ValueError, match=match) as info:
        make().generate(model, args.get("prompts", [[5, 6]]), args.get("G", 4), args.get("max_new", MAX_NEW),
                        eos_id=tok.eos_token_id, predicted_lengths=args.get("pred"))
    assert "\n" not in str(info.value)


def test_schedulers_are_registered_with_default_configs(fresh_host):
    host = fresh_host()
    reg = host.registries.by_kind["sampler_schedulers"]
    for name, cls in [("full_group", FullGroupScheduler), ("micro_group", MicroGroupScheduler),
                      ("continuous", ContinuousScheduler), ("length_aware", LengthAwareScheduler)]:
        entry = reg.get(name)
        obj = entry.factory(**dataclasses.asdict(entry.config()))
        assert isinstance(obj, cls) and hasattr(obj, "schedule") and hasattr(obj, "generate")


@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 1.0, "top_k": 50}],
                         ids=["greedy", "seeded"])
def test_partial_decode_probe_then_plan_matches_the_simulator(lm, sampling):
    from plait.plugins.infinite_sampling.predictor import LengthPredictor

    model, _ = lm
    bpt, k, g, G = kv_bytes_per_token(model), 3, 2, 5
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]  # equal P: one prompt length per probe round
    forced = scripted(2, G, seed=3)
    predictor = LengthPredictor(prefix_tokens=k, seed=0)
    predictor.update([prompts[0], prompts[1]], [[1, 2, 3], [4, 5, 6]], [2.0, 6.0])  # any fixed predictor will do
    sched = LengthAwareScheduler(g=g, prefix_tokens=k)
    r = run(sched, lm, prompts, G, forced, sampling=sampling, predicted_lengths=predictor)
    ref = run(ContinuousScheduler(g=g), lm, prompts, G, forced, sampling=sampling)
    assert r.completions == ref.completions  # probing and resuming does not change a single token
    jobs = [(b, i) for b in range(2) for i in range(G)]
    probe = [[min(forced[j], k) for j in jobs[s:s + g]] for s in range(0, len(jobs), g)]
    sim_probe = simulate_barrier(probe, [4] * len(probe))
    left = [j for j in jobs if forced[j] > k]
    assert sorted(sched.last_predictions) == sorted(left)
    want = predictor.predict_batch([prompts[b] for b, _ in left], [r.completions[b][i][:k] for b, i in left])
    pred = [sched.last_predictions[j] for j in left]
    assert pred == [min(max(int(round(v)), 1), MAX_NEW - k) for v in want]
    sim_rest = simulate_slots({j: forced[j] - k for j in left}, g, PlannedDispatcher(left, pred, g),
                              {j: 4 + k for j in left})
    assert r.stats.probe_steps == sim_probe.steps
    assert r.stats.decode_steps == sim_probe.steps + sim_rest.steps
    assert r.stats.live_kv_trace == [t * bpt for t in sim_probe.live_tokens + sim_rest.live_tokens]
    assert r.stats.prefills == 2 + len(left)  # one shared prefill per prompt, one resume per unfinished job
    with pytest.raises(ValueError, match="prefix_tokens = 3 needs a predictor"):
        run(sched, lm, prompts, G, forced, predicted_lengths=[4] * 10)
