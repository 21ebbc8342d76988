"""flashdp layer kinds one at a time against per-sample references (float64, σ = 0, clipping active), and what
is frozen or refused: unsupported parameters, sample-mixing layers, subclasses with their own forward."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from tests.plugins.flashdp.flashdp_reference import check_against_reference, dp_step, make_dp


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(B, n=3, seed=1):
    return torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(seed))


def ce(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


class Head(nn.Module):
    """``body`` then a mean over every non-batch, non-feature position and a Linear head (3 classes)."""

    def __init__(self, body: nn.Module, features: int, feature_dim: int = 1):
        super().__init__()
        self.body, self.feature_dim = body, feature_dim
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x)).movedim(self.feature_dim, -1)
        return self.head(h.reshape(h.shape[0], -1, h.shape[-1]).mean(1))


def _exact(body, features, x, *, feature_dim=1, mode="per_layer", C=0.05, use_vmap=True):
    torch.manual_seed(0)
    model = Head(body, features, feature_dim).double()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        before = ref(x)
    t = make_dp(C if mode == "per_layer" else 4 * C, mode)
    clipped = check_against_reference(model, ref, t, ce, (x, _labels(x.shape[0])), use_vmap=use_vmap)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-13)  # same function
    return t, clipped


CONVS = {
    "conv2d": lambda: nn.Conv2d(3, 6, 3),
    "conv2d-depthwise-stride2": lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3),
    "conv2d-grouped-dilated-nobias": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
    "conv2d-same-even-kernel": lambda: nn.Conv2d(3, 4, 4, padding="same"),
    "conv2d-valid-stride21": lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding="valid"),
    "conv2d-reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv2d-circular": lambda: nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="circular"),
    "conv2d-replicate-depthwise-x2": lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="replicate", groups=4),
    "conv2d-whole-image": lambda: nn.Conv2d(3, 5, 7),  # one output position: the ghost-norm path
    "conv1d": lambda: nn.Conv1d(3, 6, 5, padding=2),
    "conv1d-depthwise-same-reflect": lambda: nn.Conv1d(3, 3, 4, padding="same", padding_mode="reflect", groups=3),
    "conv1d-stride2-grouped": lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2),
}


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_layers_equal_per_sample_reference(name, mode):
    conv = CONVS[name]()
    x = _x(4, conv.in_channels, 7, 7) if isinstance(conv, nn.Conv2d) else _x(4, conv.in_channels, 9)
    t, clipped = _exact(conv, conv.out_channels, x, mode=mode)
    assert clipped > 0.5
    assert type(t.groups[0].param) is nn.Parameter and t.groups[0].name == "body.weight"


class _QNorm(nn.Module):
    """Qwen3's q_norm: an RMSNorm over head_dim of (B, T, heads, head_dim)."""

    def __init__(self):
        super().__init__()
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

        self.proj = nn.Linear(8, 8)
        self.norm = Qwen3RMSNorm(4)

    def forward(self, x):  # (B, T, 8)
        return self.norm(self.proj(x).view(*x.shape[:2], 2, 4)).flatten(2)


NORMS = {
    "rmsnorm": (lambda: nn.RMSNorm(8), (5, 6, 8), -1, 8),
    "rmsnorm-2d-shape": (lambda: nn.RMSNorm((3, 8)), (5, 3, 8), -1, 8),
    "qwen3-rmsnorm-per-head": (_QNorm, (5, 6, 8), -1, 8),
    "llama-rmsnorm": (lambda: __import__("transformers.models.llama.modeling_llama", fromlist=["x"]).LlamaRMSNorm(8),
                      (5, 6, 8), -1, 8),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((3, 8)), (5, 3, 8), -1, 8),
    "layernorm-no-bias": (lambda: nn.LayerNorm(8, bias=False), (5, 6, 8), -1, 8),
    "groupnorm-4d": (lambda: nn.GroupNorm(2, 6), (5, 6, 4, 3), 1, 6),
    "groupnorm-3d": (lambda: nn.GroupNorm(3, 6), (5, 6, 7), 1, 6),
}


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_layers_equal_per_sample_reference(name, mode):
    factory, shape, feature_dim, features = NORMS[name]
    x = _x(*shape) * 2 + 0.5
    t, clipped = _exact(factory(), features, x, feature_dim=feature_dim, mode=mode)
    assert clipped > 0.5
    assert t.frozen == []


class _Attention(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.attn = nn.MultiheadAttention(8, 2, batch_first=variant != "seq-first", bias=variant != "no-bias")
        mask = torch.zeros(5, 5, dtype=torch.float64)
        mask[0, 3:] = -1e4  # float mask added to the scores
        self.register_buffer("mask", mask)

    def forward(self, x):  # (B, 5, 8)
        v = self.variant
        if v == "seq-first":
            x = x.transpose(0, 1)
            return self.attn(x, x, x, need_weights=False)[0].transpose(0, 1)
        if v == "weights":
            out, w = self.attn(x, x, x, attn_mask=self.mask)
            return out + w.sum(-1, keepdim=True)
        if v == "cross":  # query ≠ key = value, different lengths
            return self.attn(x, x[:, :3] * 2, x[:, :3] * 2, need_weights=False)[0]
        if v == "distinct":
            return self.attn(x, torch.sin(x), torch.cos(x), need_weights=False)[0]
        if v == "bool-masks":
            causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
            pad = x[:, :, 0] > 1.2  # per sample
            pad[:, 0] = False
            return self.attn(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("variant", ["self", "seq-first", "weights", "cross", "distinct", "bool-masks", "no-bias"])
def test_multihead_attention_equals_per_sample_reference(variant):
    x = _x(4, 5, 8)
    # torch's own forward checks the masks' values in Python (data-dependent): a loop of grad() there
    t, clipped = _exact(_Attention(variant), 8, x, feature_dim=-1, use_vmap=variant != "bool-masks")
    assert clipped > 0.5
    names = {g.name for g in t.groups}
    assert {"body.attn.in_proj_weight", "body.attn.out_proj.weight"} <= names


def test_multihead_attention_with_bias_kv_is_frozen_or_refused():
    body = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    model = Head(_Wrap(body), 8, -1)
    t = make_dp(unsupported="freeze")
    t.prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)
    assert {"body.m.in_proj_weight", "body.m.bias_k", "body.m.out_proj.weight"} <= set(t.frozen)
    with pytest.raises(ValueError, match=r"parameter 'body.m.in_proj_weight' is trainable but its layer has no DP "
                                         r"version \(MultiheadAttention"):
        make_dp().prepare(Head(_Wrap(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)), 8, -1),
                          dataset_size=100, batch_size=4, steps=1, seed=0)


class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, x, x, need_weights=False)[0]


class _FlatTokens(nn.Module):
    """OPT's MLP pattern: (B, T, d) flattened to (B·T, d) rows before Linear and LayerNorm, then viewed back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        flat = h.reshape(-1, h.shape[-1])
        flat = self.fc2(torch.relu(self.fc1(self.ln(flat))))
        return self.head((h + flat.view_as(h)).mean(1))


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
def test_flattened_token_rows_are_regrouped_per_sample(mode):
    torch.manual_seed(0)
    model = _FlatTokens().double()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    t = make_dp(0.05 if mode == "per_layer" else 0.2, mode)
    assert check_against_reference(model, ref, t, ce, (ids, _labels(4))) > 0.5


def test_rows_that_are_not_samples_are_an_error():
    class FloatTokens(_FlatTokens):  # float input: the model's input gives no token count, so no regrouping
        def forward(self, x):
            flat = x.reshape(-1, 8)
            return self.head((x + self.fc2(torch.relu(self.fc1(flat))).view_as(x)).mean(1))

    model = FloatTokens().double()
    t = make_dp(0.05, unsupported="freeze")
    with pytest.raises(RuntimeError, match=r"DP layer of 'fc2.weight' saw 12 rows for a batch of 4"):
        dp_step(model, t, ce, (_x(4, 3, 8), _labels(4)))


class _ScaledEmbedding(nn.Embedding):
    """Gemma3-like: an nn.Embedding subclass whose own forward scales the rows."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class _Embedder(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("unsupported", ["freeze", "error"])
def test_embedding_subclass_with_its_own_forward_is_refused_by_name(unsupported):
    model = _Embedder(_ScaledEmbedding(10, 4))
    with pytest.raises(ValueError, match=r"^'emb' is a _ScaledEmbedding, an nn.Embedding subclass with its own "
                                         r"forward: .*; add 'emb' to grad_transform.skip to freeze it$"):
        make_dp(unsupported=unsupported).prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)
    assert type(model.emb) is _ScaledEmbedding  # never silently replaced
    ids = torch.randint(0, 10, (4, 5))
    before = model(ids)
    t = make_dp(skip=["emb"])
    t.prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)  # skipped: frozen, its forward kept
    assert type(model.emb) is _ScaledEmbedding and not model.emb.weight.requires_grad and t.frozen == ["emb"]
    torch.testing.assert_close(model(ids), before)


def test_linear_subclass_with_its_own_forward_is_refused_and_one_without_is_handled():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    with pytest.raises(ValueError, match=r"'0' is a Doubled, an nn.Linear subclass with its own forward"):
        make_dp().prepare(nn.Sequential(Doubled(3, 3)), dataset_size=100, batch_size=4, steps=1, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(Plain(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ref = copy.deepcopy(model)
    assert check_against_reference(model, ref, make_dp(), ce, (_x(4, 5), _labels(4))) > 0.5


def test_gemma3_scaled_word_embedding_is_handled_exactly():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    model = _Embedder(Gemma3TextScaledWordEmbedding(10, 4, padding_idx=0, embed_scale=4 ** 0.5)).double()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 10, (5, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ref(ids)
    assert check_against_reference(model, ref, make_dp(), ce, (ids, _labels(5))) > 0.5
    assert type(model.emb).forward is Gemma3TextScaledWordEmbedding.forward  # the scale stays
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-15)


def test_batchnorm_in_training_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for unsupported in ("freeze", "error"):
        with pytest.raises(ValueError, match=r"^'1' \(BatchNorm1d\) normalises with the statistics of the whole batch, "
                                             r"so one sample's gradient depends on the others .*replace it with "
                                             r"nn.GroupNorm"):
            make_dp(unsupported=unsupported).prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)
    model[1].requires_grad_(False)  # frozen parameters do not help: the forward still mixes the samples
    with pytest.raises(ValueError, match="BatchNorm1d"):
        make_dp().prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)


def test_batchnorm_in_eval_mode_is_frozen_and_may_not_return_to_training(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()  # running statistics
    t = make_dp(unsupported="freeze")
    t.prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)
    assert t.summary()["dp/frozen"] == ["1.weight", "1.bias"]
    assert "froze 2 trainable parameter(s) without a DP version: 1.weight, 1.bias" in capsys.readouterr().err
    model(torch.randn(3, 4))
    model.train()
    with pytest.raises(RuntimeError, match=r"'1' \(BatchNorm1d\) runs in training mode under DP"):
        model(torch.randn(3, 4))


class _WithPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.act = nn.PReLU()  # no DP version
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def test_unsupported_layer_is_frozen_listed_and_reported_in_one_line(capsys):
    torch.manual_seed(0)
    model = _WithPReLU().double()
    ref = copy.deepcopy(model)
    ref.act.requires_grad_(False)
    t = make_dp(unsupported="freeze")
    assert check_against_reference(model, ref, t, ce, (_x(4, 5), _labels(4))) > 0.5
    assert t.summary()["dp/frozen"] == ["act.weight"] and not model.act.weight.requires_grad
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["plait: flashdp: froze 1 trainable parameter(s) without a DP version: act.weight (listed in "
                   "summary dp/frozen; grad_transform.unsupported=error refuses them instead)"]
    with pytest.raises(ValueError, match=r"^parameter 'act.weight' is trainable but its layer has no DP version "
                                         r"\(PReLU; supported: Linear, "):
        make_dp(unsupported="error").prepare(_WithPReLU(), dataset_size=100, batch_size=4, steps=1, seed=0)


def test_nothing_left_to_train_is_refused():
    model = nn.Sequential(nn.PReLU(), nn.LSTM(3, 3))
    with pytest.raises(ValueError, match=r"^Sequential: nothing left to train: it has no trainable parameter with a "
                                         r"DP version \(supported: .*\); without one: 0.weight, 1.weight_ih_l0"):
        make_dp(unsupported="freeze").prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)


class _OnePlusRMSNorm(nn.Module):
    """Gemma's form y = x̂ ⊙ (1 + w): not a pure scaling by the weight, so it fails the probe."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_rmsnorm_that_is_not_a_weight_scaling_is_frozen_not_approximated():
    model = nn.Sequential(nn.Linear(4, 4), _OnePlusRMSNorm(4), nn.Linear(4, 2))
    t = make_dp(unsupported="freeze")
    t.prepare(model, dataset_size=100, batch_size=4, steps=1, seed=0)
    assert t.frozen == ["1.weight"] and type(model[1]) is _OnePlusRMSNorm


def test_gradient_reaching_a_dp_parameter_outside_its_layer_is_an_error():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # the layer, and its weight read directly: that second path is not clipped
            return self.fc(x) + torch.nn.functional.linear(x, self.fc.weight)

    model = Leaky().double()
    with pytest.raises(RuntimeError, match=r"parameter 'fc.weight' received a gradient outside its DP layer"):
        dp_step(model, make_dp(), ce, (_x(4, 4), _labels(4)))


def test_layer_called_twice_in_one_forward_is_an_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(RuntimeError, match=r"DP layer of 'fc.weight' ran its backward twice in one step"):
        dp_step(Twice().double(), make_dp(), ce, (_x(4, 4), _labels(4)))


class _Tokens(nn.Module):
    """A ViT-like model-level module: raw (1, …) parameters broadcast over the batch, one of them used twice."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.pos = nn.Parameter(torch.randn(1, 4, 6) * 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, 6) * 0.5)
        self.scale = nn.Parameter(torch.ones(6))  # 1-D: not broadcast-shaped, no DP version
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 4, 3)
        h = self.proj(x) + self.pos
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), torch.tanh(h) * self.pos], 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("mode", ["per_layer", "flat"])
def test_broadcast_parameters_get_per_sample_gradients(mode, capsys):
    torch.manual_seed(0)
    model = _Tokens().double()
    ref = copy.deepcopy(model)
    ref.scale.requires_grad_(False)
    t = make_dp(0.05 if mode == "per_layer" else 0.2, mode, unsupported="freeze")
    assert check_against_reference(model, ref, t, ce, (_x(5, 4, 3), _labels(5))) > 0.5
    assert {"pos", "cls"} <= {g.name for g in t.groups} and t.frozen == ["scale"]
    with torch.no_grad():  # outside a training forward the attribute is the parameter itself
        assert model.pos is model._parameters["pos"]


def test_per_layer_thresholds_and_noise_cover_the_new_kinds():
    """Patterns over the new group names; the noise std is σ·√ΣC_k² on a conv weight, a norm weight and a
    broadcast parameter (the same rule as the other groups)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.GroupNorm(4, 64), nn.Conv2d(64, 64, 3, groups=64)).double()
    t = make_dp(1.0, thresholds={"0.weight": 0.5, "1.*": 0.25}, noise_multiplier=2.0)
    t.prepare(model, dataset_size=1000, batch_size=4, steps=1, seed=0)
    thr = {g.name: g.threshold for g in t.groups}
    assert thr["0.weight"] == 0.5 and thr["1.weight"] == thr["1.bias"] == 0.25
    t.before_backward(1)
    (0 * model(_x(4, 3, 6, 6)).sum()).backward()  # zero gradients: the update is the noise alone
    t.expected_batch = 1.0
    t(model, 1)
    std = 2.0 * math.sqrt(sum(v ** 2 for v in thr.values()))
    noise = torch.cat([model[0].weight.grad.flatten(), model[1].weight.grad, model[2].weight.grad.flatten()])
    assert noise.numel() > 2000 and abs(noise.std().item() / std - 1) < 0.06
