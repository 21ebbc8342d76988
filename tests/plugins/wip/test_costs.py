"""The op counter against closed-form counts of a tiny LLaMA forward, and the energy table."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.wip.attention import swap_attention
from plait.plugins.wip.costs import ENERGY_PJ, OpCounter, energy_pj

B, T = 2, 10


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return build_causal_lm(arch="llama")[0].eval()


def count(model, operator, mixer="exact"):
    swapped = swap_attention(copy.deepcopy(model), operator, mixer)
    with torch.no_grad(), OpCounter().watch(swapped) as counter:
        swapped(input_ids=torch.randint(4, 1000, (B, T)))
    return counter, swapped


@pytest.mark.parametrize("operator", ["l1", "pot", "minprod", "mitchell"])
def test_multiplication_free_operators_have_no_multiplication_in_qk(llama, operator):
    counter, _ = count(llama, operator)
    assert counter.counts["qk"]["fp_mul"] == 0
    assert counter.counts["qk"]["fp_add"] > 0


def test_exact_qk_and_av_counts_match_the_closed_form(llama):
    cfg = llama.config
    layers, heads, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    counter, _ = count(llama, "exact")
    logits = layers * B * heads * T * T
    assert counter.counts["qk"]["fp_mul"] == logits * d
    assert counter.counts["qk"]["fp_add"] == logits * (d - 1)
    assert counter.counts["scale"]["fp_mul"] == logits
    assert counter.counts["av"]["fp_mul"] == layers * B * heads * T * d * T
    assert counter.counts["av"]["fp_add"] == layers * B * heads * T * d * (T - 1)


def test_minprod_counts_one_compare_and_one_add_per_pair(llama):
    cfg = llama.config
    d = cfg.hidden_size // cfg.num_attention_heads
    pairs = cfg.num_hidden_layers * B * cfg.num_attention_heads * T * T * d
    counter, _ = count(llama, "minprod")
    assert counter.counts["qk"]["cmp"] == pairs
    assert counter.counts["qk"]["fp_add"] == pairs - pairs // d


def test_dim_scales_are_counted_as_per_element_multiplications_of_q_and_k(llama):
    cfg = llama.config
    d = cfg.hidden_size // cfg.num_attention_heads
    swapped = swap_attention(copy.deepcopy(llama), "minprod", dim_scales=True)
    with torch.no_grad(), OpCounter().watch(swapped) as counter:
        swapped(input_ids=torch.randint(4, 1000, (B, T)))
    # q·a per query head and k·b per key/value head (grouped-query: fewer key heads), every layer
    per_layer = B * (cfg.num_attention_heads * T + cfg.num_key_value_heads * T) * d
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert counter.counts["prep"]["fp_mul"] == cfg.num_hidden_layers * per_layer
    assert counter.counts["qk"]["fp_mul"] == 0


def test_pot_mixer_removes_the_av_multiplications_but_the_renormalisation(llama):
    cfg = llama.config
    d = cfg.hidden_size // cfg.num_attention_heads
    rows = cfg.num_hidden_layers * B * cfg.num_attention_heads * T
    counter, _ = count(llama, "minprod", mixer="pot")
    assert counter.counts["av"]["fp_mul"] == rows * (d + 1)
    assert counter.counts["av"]["int_add"] == rows * d * T


def test_linear_layers_are_counted_from_their_shapes(llama):
    counter, swapped = count(llama, "minprod")
    want = sum(B * T * m.in_features * m.out_features for m in swapped.modules() if isinstance(m, nn.Linear))
    assert counter.counts["linear"]["fp_mul"] == want
    assert counter.total()["fp_mul"] == want + counter.counts["scale"]["fp_mul"] + counter.counts["av"]["fp_mul"]


def test_nothing_is_counted_outside_the_context(llama):
    counter, swapped = count(llama, "exact")
    before = counter.as_dict()
    with torch.no_grad():
        swapped(input_ids=torch.randint(4, 1000, (B, T)))
    assert counter.as_dict() == before


def test_energy_uses_the_horowitz_45nm_table():
    assert ENERGY_PJ["fp32"] == {"fp_mul": 3.7, "fp_add": 0.9, "int_add": 0.1, "cmp": 0.1}
    assert energy_pj({"fp_mul": 10, "fp_add": 20, "int_add": 30, "cmp": 40}) == pytest.approx(
        10 * 3.7 + 20 * 0.9 + 30 * 0.1 + 40 * 0.1)
    assert energy_pj({"fp_mul": 10, "fp_add": 20}, "fp16") == pytest.approx(10 * 1.1 + 20 * 0.4)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        energy_pj({}, "int4")


def test_minprod_attention_energy_is_below_exact(llama):
    exact, _ = count(llama, "exact")
    mp, _ = count(llama, "minprod")
    qk = ("qk",)
    # per pair: exact 3.7 + 0.9 pJ, minprod 0.1 + 0.9 pJ (accumulate of the first pair excluded by both)
    ratio = energy_pj(mp.total(qk)) / energy_pj(exact.total(qk))
    cfg = llama.config
    d = cfg.hidden_size // cfg.num_attention_heads
    assert ratio == pytest.approx((0.1 * d + 0.9 * (d - 1)) / (3.7 * d + 0.9 * (d - 1)))
