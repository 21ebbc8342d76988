"""DP on every model the runtime ships, exact against per-sample references (float64, σ = 0, clipping active).

Reference: `flashdp_reference` — per-sample gradients of single samples by ``torch.func.vmap(grad(...))`` over an
untouched copy of the model, clipped per group (per-layer) or by the total norm (flat), summed.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.capsule.depthnet import build_v2_sfmlearner
from plait.plugins.capsule.pit import build_pit, build_vit
from plait.plugins.sam_if.data import build_tabular_mlp
from tests.plugins.flashdp.flashdp_reference import check_against_reference, dp_step, make_dp

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
               attn_implementation="eager")  # eager: vmap-able with a padding mask, and the same kernels as the ref
HF = {
    "opt": lambda: OPTForCausalLM(OPTConfig(**_COMMON, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, intermediate_size=64, num_key_value_heads=2,
                                                  head_dim=8)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2)),
}


def lm_loss(model, ids, mask):
    """Per-sample mean completion loss over the non-padding tokens (what sft's per-sample losses are)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    w = mask[:, 1:].to(nll.dtype)
    return (nll * w).sum(1) / w.sum(1)


def lm_batch(B=5, T=7, vocab=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0  # right padding: OPT's positions come from the mask
    mask[3, -3:] = 0
    return ids, mask


def ce(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
@pytest.mark.parametrize("arch", sorted(HF))
def test_hf_causal_lm_clipped_sum_equals_per_sample_reference(arch, mode):
    torch.manual_seed(0)
    model = HF[arch]().double().eval()
    ref = copy.deepcopy(model)
    ids, mask = lm_batch()
    t = make_dp(0.05 if mode == "per_layer" else 0.3, mode)
    with torch.no_grad():
        before = ref(input_ids=ids, attention_mask=mask).logits
    clipped = check_against_reference(model, ref, t, lm_loss, (ids, mask))
    assert clipped > 0.5  # clipping is active
    assert t.frozen == []  # every parameter trained: RMSNorm (qwen3, llama) and OPT's positions included
    kinds = {type(m).__name__ for m in model.modules()}
    assert "DPLinear" in kinds and "DPEmbedding" in kinds
    special = {"opt": "DPOPTLearnedPositionalEmbedding", "qwen3": "DPQwen3RMSNorm", "llama": "DPLlamaRMSNorm"}
    assert special[arch] in kinds
    with torch.no_grad():  # the DP model computes the same function
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=1e-13)


def test_opt_positional_embedding_keeps_its_own_forward_and_mlp_rows_are_regrouped():
    torch.manual_seed(0)
    model = HF["opt"]().double()
    t = make_dp(0.05)
    ids, mask = lm_batch()
    dp_step(model, t, lm_loss, (ids, mask))
    pos = model.model.decoder.embed_positions
    assert type(pos).forward is OPTLearnedPositionalEmbedding.forward  # the offset and position_ids logic
    assert isinstance(pos, OPTLearnedPositionalEmbedding) and pos.offset == 2
    # fc1/fc2 see (B·T, d) rows: the clipped sums were regrouped per sample (norms for B samples, not B·T rows)
    fc2 = next(g for g in t.groups if g.name.endswith("layers.0.fc2.weight"))
    assert t.ctx.last_norms[fc2.index].shape == (5,)
    # the same model without an attention mask (positions 0..T-1 for every sample)
    torch.manual_seed(0)
    model2 = HF["opt"]().double()
    ref = copy.deepcopy(model2)
    assert check_against_reference(model2, ref, make_dp(0.05), lm_loss, (ids, torch.ones_like(mask))) > 0.5


@pytest.mark.slow
def test_sft_preset_opt_tiny_is_exact():
    """The arch and size of the sft preset (model: {name: hf_causal_lm, arch: opt, size: tiny}), from the builder."""
    model, _ = build_causal_lm(arch="opt", size="tiny", config={}, path=None, tokenizer=None, dtype="float64")
    model.eval()
    ref = copy.deepcopy(model)
    ids, mask = lm_batch(B=4, T=6, vocab=model.config.vocab_size)
    assert check_against_reference(model, ref, make_dp(0.05), lm_loss, (ids, mask)) > 0.5


def _pit():
    return build_pit(image_size=16, num_classes=5, patch=4, stride=2, base_dims=[8, 8], depth=[1, 1], heads=[1, 2])


def _vit():
    return build_vit(image_size=16, num_classes=5, patch=4, stride=4, dim=16, depth=2, heads=2)


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
@pytest.mark.parametrize("name", ["pit", "vit"])
def test_capsule_vision_transformers_equal_per_sample_reference(name, mode):
    model = {"pit": _pit, "vit": _vit}[name]().double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=g)
    t = make_dp(0.05 if mode == "per_layer" else 0.2, mode)
    assert check_against_reference(model, ref, t, ce, (x, y)) > 0.5
    names = {g.name for g in t.groups}
    # the patch embedding, the attention's packed in-projection and out_proj, the position embedding and class
    # token (raw (1, …) parameters broadcast over the batch) are all trained privately
    assert {"patch_embed.weight", "pos_embed", "cls_token", "stages.0.0.attn.in_proj_weight",
            "stages.0.0.attn.out_proj.weight"} <= names
    if name == "pit":  # the pooling conv: Conv2d(8, 16, 3, stride 2, groups 8)
        assert model.pools[0].conv.groups == 8 and "pools.0.conv.weight" in names


@pytest.mark.parametrize("hidden", [[], [8, 6]])
def test_tabular_mlp_equals_per_sample_reference(hidden):
    model = build_tabular_mlp(num_features=10, num_classes=5, hidden=hidden, dtype="float64")
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
    assert check_against_reference(model, ref, make_dp(0.05), ce, (x, y)) > 0.5


_V2 = dict(height=16, width=16, depth_width=8, depth_blocks=[1, 1], pose_width=8, pose_blocks=[1, 1],
           decoder_channels=[8, 8, 8], scales=2, vibration=True, vibration_dim=8, lstm_hidden=4)


def test_v2_sfmlearner_batchnorm_is_refused_with_the_fix():
    model = build_v2_sfmlearner(**_V2).double()  # ResNet encoders: BatchNorm2d, training mode
    with pytest.raises(ValueError, match=r"'depth_encoder.bn1' \(BatchNorm2d\) normalises with the statistics of "
                                         r"the whole batch.*replace it with nn.GroupNorm"):
        make_dp(0.1, unsupported="freeze").prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)


class _V2Step(torch.nn.Module):
    """One per-sample objective over V2-SfMLearner's depth and pose nets (the model has no forward of its own)."""

    def __init__(self, v2):
        super().__init__()
        self.v = v2

    def forward(self, a, b, imu):
        disp = self.v.depth(a).disp
        axisangle, translation = self.v.pose_parameters(a, b, imu)
        return sum(d.mean((1, 2, 3)) for d in disp.values()) + 1e3 * axisangle.pow(2).sum(1) + 1e2 * translation.sum(1)


def _with_groupnorm(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.GroupNorm(2, child.num_features).to(child.weight.dtype))
        else:
            _with_groupnorm(child)
    return module


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
def test_v2_sfmlearner_with_groupnorm_equals_per_sample_reference(mode, capsys):
    """The refusal's fix applied: BatchNorm → GroupNorm. Conv2d (reflect padding), Conv1d ('same'), GroupNorm,
    Linear and the Fourier fusion are exact; the IMU LSTM has no DP version and is frozen, said in one line."""
    torch.manual_seed(0)
    v2 = _with_groupnorm(build_v2_sfmlearner(**_V2).double())
    with torch.no_grad():  # the zero-initialised fusion conv and IMU head: non-zero so every path has gradients
        v2.pose_net.fusion.proj.weight.normal_(0, 0.1)
        v2.pose_net.imu_head.weight.normal_(0, 0.1)
    model = _V2Step(v2)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(3, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    imu = torch.randn(3, 6, 10, generator=g, dtype=torch.float64)
    t = make_dp(0.02 if mode == "per_layer" else 0.1, mode, unsupported="freeze")
    # torch.func has no vmap rule for nn.LSTM: a loop of single-sample grad() calls instead
    clipped = check_against_reference(model, ref, t, lambda m, *x: m(*x), (a, b, imu), use_vmap=False)
    assert clipped > 0.3
    lstm = [f"v.vibration.lstm.{n}" for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
    assert t.summary()["dp/frozen"] == lstm
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plait: flashdp: froze 4 trainable parameter(s) without a DP version: "
                                               "v.vibration.lstm.weight_ih_l0")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DPConv2d", "DPConv1d", "DPGroupNorm", "DPLinear"} <= kinds


class _SmallCNN(torch.nn.Module):
    """Layer kinds Opacus 1.6 has per-sample rules for: Conv2d (plain, depthwise, grouped), GroupNorm, Conv1d,
    Embedding, RMSNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.grouped = torch.nn.Conv2d(8, 4, 1, groups=2, bias=False)
        self.emb = torch.nn.Embedding(11, 4)
        self.conv1d = torch.nn.Conv1d(4, 4, 3, padding=1)
        self.norm = torch.nn.RMSNorm(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x, ids):
        h = self.grouped(torch.tanh(self.dw(torch.tanh(self.gn(self.conv(x)))))).mean((2, 3))  # (B, 4)
        e = self.conv1d(self.emb(ids).transpose(1, 2)).mean(2)  # (B, 4)
        return self.head(self.norm(torch.cat([h, e], 1)))


def test_small_cnn_matches_opacus_grad_sample_module_and_the_reference():
    pytest.importorskip("opacus")
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = _SmallCNN().double()
    ref, ref2 = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (5, 6), generator=g)
    y = torch.randint(0, 5, (5,), generator=g)

    def loss(m, x, ids, y):
        return torch.nn.functional.cross_entropy(m(x, ids), y, reduction="none")

    t = make_dp(0.05)
    assert check_against_reference(model, ref, t, loss, (x, ids, y)) > 0.5
    gsm = GradSampleModule(ref2, loss_reduction="sum")  # the backwarded loss is a per-sample sum
    loss(gsm, x, ids, y).sum().backward()
    for grp in t.groups:
        p = ref2.get_parameter(grp.name)
        norms = p.grad_sample.flatten(1).norm(dim=1)
        torch.testing.assert_close(t.ctx.last_norms[grp.index], norms, rtol=0, atol=1e-13, msg=grp.name)
        f = (grp.threshold / (norms + 1e-6)).clamp(max=1.0)
        want = (p.grad_sample * f.view(-1, *[1] * p.dim())).sum(0)
        torch.testing.assert_close(grp.param.grad, want, rtol=0, atol=1e-13, msg=grp.name)
