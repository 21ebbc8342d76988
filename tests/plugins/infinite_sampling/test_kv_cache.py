"""Regression: the first GPU run (2026-12-04, transformers 5.17.0) failed every scheduler with
``TypeError: 'NoneType' object is not subscriptable`` at ``kv_cache.prefill``.

`kv_cache.prefill` and `SlotKVCache.decode` handed their cache to the model as ``cache=``, the keyword that
transformers 5.25 takes; 5.17 (and every earlier 5.x / 4.x release in the ``transformers>=4.45,<6`` range) names it
``past_key_values`` and lets an unknown ``cache=`` fall through ``**kwargs`` unused. The model then built its own
cache, ours stayed empty (``layer.keys is None``) and ``layer.keys[0]`` raised. Decode had the same bug, where it
would have run without the slot cache.

These tests run on whatever transformers is installed, with a tiny Qwen3 behind a wrapper whose ``forward`` has the
5.17 signature (``past_key_values``, unknown keywords swallowed), so they fail before the fix on any version.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.infinite_sampling.kv_cache import SlotKVCache, prefill
from plait.plugins.infinite_sampling.samplers import (
    ContinuousScheduler,
    FullGroupScheduler,
    LengthAwareScheduler,
    MicroGroupScheduler,
)

MAX_NEW = 6


def _cache_name(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PastKeyValuesOnly(torch.nn.Module):
    """A causal LM whose ``forward`` looks like transformers <= 5.17: the cache is ``past_key_values``; any other
    keyword (``cache=`` included) is accepted and ignored, as 5.17's ``**kwargs`` does."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{_cache_name(self.inner): past_key_values})


class IgnoresCache(PastKeyValuesOnly):
    """A model that never uses the cache it is given (it builds its own, like 5.17 with an unknown keyword)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = build_causal_lm(arch="qwen3", size="tiny")
    yield model.eval(), tok
    torch.set_num_threads(threads)


def test_prefill_and_decode_fill_the_cache_of_a_past_key_values_model(lm):
    model, _ = lm
    old = PastKeyValuesOnly(model).eval()
    seq = [5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0].float()
    kv = prefill(old, seq[:4])  # raised TypeError: 'NoneType' object is not subscriptable
    assert kv.length == 4
    torch.testing.assert_close(kv.last_logits, ref[3], atol=1e-5, rtol=0)
    cache = SlotKVCache(old, rows=2, capacity=8)
    cache.fill(1, kv)
    out = cache.decode(old, [0, seq[4]], [False, True])
    torch.testing.assert_close(out[1], ref[4], atol=1e-5, rtol=0)
    assert cache.lengths[1] == 5


@pytest.mark.parametrize("make", [lambda: FullGroupScheduler(), lambda: MicroGroupScheduler(g=2),
                                  lambda: ContinuousScheduler(g=2), lambda: LengthAwareScheduler(g=2)],
                         ids=["full_group", "micro_group", "continuous", "length_aware"])
def test_schedulers_on_a_past_key_values_model_match_the_current_api(lm, make):
    """What sampling_gpu.py runs (G=4 rows, g=2, scripted lengths, greedy), on the 5.17-style model."""
    model, tok = lm
    prompts, G = [[5, 6, 7, 8], [9, 10, 11]], 4
    forced = {(b, i): 1 + (3 * b + i) % MAX_NEW for b in range(len(prompts)) for i in range(G)}
    kw = dict(step=0, sampling={"greedy": True}, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              forced_lengths=forced)
    ref = make().generate(model, prompts, G, MAX_NEW, **kw)
    out = make().generate(PastKeyValuesOnly(model), prompts, G, MAX_NEW, **kw)
    assert out.completions == ref.completions
    assert out.lengths == [[forced[(b, i)] for i in range(G)] for b in range(len(prompts))]


def test_a_model_that_ignores_the_cache_gets_a_clear_error(lm):
    model, _ = lm
    with pytest.raises(RuntimeError, match="did not write the KV cache"):
        prefill(IgnoresCache(model).eval(), [5, 6, 7])
