"""The wip_attention transform on HF OPT / Qwen3 / LLaMA: exact swap is bit-identical, masks still hold."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.wip.attention import WipAttention, swap_attention, wip_modules
from plait.plugins.wip.operators import OPERATORS

ARCHS = ("opt", "qwen3", "llama")


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        out[arch] = build_causal_lm(arch=arch)[0].eval()  # eager attention, the basics default
    return out


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_operator_reproduces_the_original_logits_exactly(models, arch):
    model = models[arch]
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        swapped = swap_attention(copy.deepcopy(model), "exact")
        got = swapped(input_ids=ids, attention_mask=mask).logits
    assert swapped.config._attn_implementation == "wip"
    assert len(wip_modules(swapped)) == swapped.config.num_hidden_layers
    assert torch.equal(got, ref)


def test_exact_operator_reproduces_greedy_generation_with_the_kv_cache(models):
    model = models["llama"]
    ids = batch()[0][:1, :6]
    swapped = swap_attention(copy.deepcopy(model), "exact")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(swapped.generate(ids, **kw), model.generate(ids, **kw))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("operator", ["l1", "pot", "minprod", "mitchell"])
def test_other_operators_change_logits_but_stay_causal(models, arch, operator):
    swapped = swap_attention(copy.deepcopy(models[arch]), operator)
    ids = batch()[0]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 1000 + 4
    with torch.no_grad():
        a = swapped(input_ids=ids).logits
        b = swapped(input_ids=changed).logits
        ref = models[arch](input_ids=ids).logits
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, ref)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)  # the future never leaks into the past


def test_opt_query_is_unscaled_before_a_nonlinear_operator(models):
    """OPT passes q·(1/√d) with scaling=1; minprod must see q itself and scale its output instead."""
    model = copy.deepcopy(models["opt"])
    attn = model.model.decoder.layers[0].self_attn
    swap_attention(model, "minprod")
    seen = {}
    wip = attn.wip

    class Spy(WipAttention):
        def forward(self, module, query, key, value, mask, scaling, dropout=0.0):
            seen["query"], seen["scaling"] = query, scaling
            return super().forward(module, query, key, value, mask, scaling, dropout)

    spy = Spy("minprod", wip.num_heads)
    attn.wip = spy
    hidden = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn(hidden)
        q = attn.q_proj(hidden).view(1, 4, wip.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, 4, wip.num_heads, -1).transpose(1, 2)
    assert seen["scaling"] == 1.0
    torch.testing.assert_close(seen["query"], q * attn.scaling)
    want = (torch.sign(q[..., :, None, :] * k[..., None, :, :])
            * torch.minimum(q[..., :, None, :].abs(), k[..., None, :, :].abs())).sum(-1) * attn.scaling
    assert not torch.allclose(want, spy.op.sim(seen["query"], k))  # scaling q first would be a different kernel
    probs = spy(attn, seen["query"], k, k, None, 1.0)[1]
    torch.testing.assert_close(probs, torch.softmax(want, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_dim_scales_start_as_the_identity_and_follow_the_kv_heads(models, arch):
    base = models[arch]
    plain = swap_attention(copy.deepcopy(base), "minprod")
    scaled = swap_attention(copy.deepcopy(base), "minprod", dim_scales=True)
    cfg = base.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for w in wip_modules(scaled):
        assert w.q_scale.shape == (cfg.num_attention_heads, w.head_dim // 2)
        assert w.k_scale.shape == (kv, w.head_dim // 2)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           scaled(input_ids=ids, attention_mask=mask).logits)
        for w in wip_modules(scaled):
            w.k_scale.mul_(3.0)  # a real change of the operator's input reaches the logits
        assert not torch.allclose(plain(input_ids=ids, attention_mask=mask).logits,
                                  scaled(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_operator_applies_its_dim_scales_like_a_rescaled_key_projection(models, arch):
    # with dim_scales the uncalibrated exact operator must not take the op-for-op fast path that ignores them
    base = models[arch]
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for layer in ref.model.decoder.layers if arch == "opt" else ref.model.layers:
            attn = layer.self_attn
            if arch == "qwen3":  # k = k_norm(k_proj x): the norm's weight scales k after the projection
                attn.k_norm.weight.mul_(3.0)
            else:
                attn.k_proj.weight.mul_(3.0)
                if attn.k_proj.bias is not None:
                    attn.k_proj.bias.mul_(3.0)
    scaled = swap_attention(copy.deepcopy(base), "exact", dim_scales=True)
    ids, mask = batch()
    with torch.no_grad():
        for w in wip_modules(scaled):
            w.k_scale.mul_(3.0)
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = scaled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base(input_ids=ids, attention_mask=mask).logits, atol=1e-3)


def test_swapping_again_replaces_the_operator(models):
    model = swap_attention(copy.deepcopy(models["llama"]), "l1")
    swap_attention(model, "exact")
    ids = batch()[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, models["llama"](input_ids=ids).logits)
    assert {w.op.name for w in wip_modules(model)} == {"exact"}


def test_unknown_operator_and_mixer_are_one_line_errors(models):
    with pytest.raises(ValueError, match="unknown attention operator 'adder'; allowed: exact, l1"):
        swap_attention(copy.deepcopy(models["opt"]), "adder")
    with pytest.raises(ValueError, match="unknown attention mixer 'shift'; allowed: exact, pot"):
        swap_attention(copy.deepcopy(models["opt"]), "minprod", mixer="shift")


class HandRolledAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def test_a_model_whose_attention_cannot_be_swapped_is_named():
    model = nn.Sequential(HandRolledAttention())
    with pytest.raises(ValueError, match="cannot swap the attention of Sequential: HandRolledAttention does not "
                                         "call transformers' ALL_ATTENTION_FUNCTIONS"):
        swap_attention(model, "minprod")
    with pytest.raises(ValueError, match="Sequential has no attention module to swap"):
        swap_attention(nn.Sequential(nn.Linear(4, 4)), "minprod")


def test_transform_entry_builds_and_applies(fresh_host, models):
    entry = fresh_host().registries.model_transforms.get("wip_attention")
    assert entry.plugin == "wip" and entry.doc
    transform = entry.factory(**vars(entry.config()))
    model = transform(copy.deepcopy(models["qwen3"]))
    assert {w.op.name for w in wip_modules(model)} == {"minprod"}
    with pytest.raises(ValueError, match="allowed: " + ", ".join(OPERATORS)):
        entry.factory(operator="nope", mixer="exact", key_bias=False, dim_scales=False)
