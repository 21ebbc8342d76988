"""Swap the attention of Hugging Face causal LMs for a WiP similarity operator, without copying HF code.

OPT, Qwen3 and LLaMA attention modules (and every other HF model written against the attention interface)
compute their projections, RoPE, norms and caches themselves and then call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)(module, q, k, v, mask, scaling=…)``.
So :func:`swap_attention` registers one attention function named ``"wip"`` (and the eager mask builder
under the same name, so causal/padding masks are still made), points the model's config at it, and hangs a
:class:`WipAttention` (the operator plus per-head calibration parameters) on each attention module as
``module.wip``. The registered function looks that child up and lets it compute softmax(α·s(q,k)·scale +
γ·‖k‖₁·scale + β + mask)·V.

Two details the function handles for every model:

* grouped-query attention: keys/values with fewer heads are repeated, as HF's eager path does;
* OPT multiplies q by ``module.scaling`` before the call and passes ``scaling=1.0``. For ``exact`` that is
  kept as is (bit-identical logits); for the other operators q is divided back, because they are not
  bilinear (min(|q|/√d, |k|) ≠ min(|q|, |k|)/√d) and the scale is applied to their output instead.

With ``exact`` and no calibration the path is HF's eager attention op for op, so logits are identical
(tests/plugins/wip/test_attention.py).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .costs import record_attention
from .operators import check_mixer, get_operator, mix

IMPLEMENTATION = "wip"
_PARAM_NAMES = ("alpha", "beta", "gamma")


def register_attention_function() -> None:
    """Register ``"wip"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, wip_attention_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class WipAttention(nn.Module):
    """Operator, mixer and per-head calibration (α scale, β bias, γ key-norm bias) of one attention layer.

    Calibration parameters start at the identity (α=1, β=γ=0) and are used once ``calibrated`` is set
    (by :func:`plait.plugins.wip.recovery.calibrate`, or by loading a calibrated state dict). β is a per-head
    constant, which softmax ignores; it is kept because it is part of the least-squares fit that makes α
    and γ the best affine match of the exact logits, and it costs one add per logit.
    """

    def __init__(self, operator: str, num_heads: int, mixer: str = "exact", key_bias: bool = False,
                 head_dim: int = 1, dim_scales: bool = False, kv_heads: int | None = None):
        super().__init__()
        self.op = get_operator(operator)
        self.mixer = check_mixer(mixer)
        self.key_bias = key_bias
        self.num_heads = num_heads
        self.kv_heads = kv_heads or num_heads
        if num_heads % self.kv_heads:
            raise ValueError(f"{num_heads} query heads cannot share {self.kv_heads} key/value heads")
        self.head_dim = head_dim
        self.dim_scales = dim_scales
        if dim_scales:
            # per-dimension input scales of the operator: q_d·a_d (per query head), k_d·b_d (per key/value head),
            # one value per RoPE rotation pair (d, d + D/2) so that they commute with rotate_half RoPE and fold
            # into the q/k projection weights; trained by the fine-tune (identity at 1)
            half = head_dim // 2 if head_dim % 2 == 0 else head_dim
            self.q_scale = nn.Parameter(torch.ones(num_heads, half))
            self.k_scale = nn.Parameter(torch.ones(self.kv_heads, half))
        self.alpha = nn.Parameter(torch.ones(num_heads))
        self.beta = nn.Parameter(torch.zeros(num_heads))
        self.gamma = nn.Parameter(torch.zeros(num_heads))
        self.register_buffer("calibrated", torch.tensor(False))
        self.collector = None  # a recovery.CalibrationStats while calibration data is collected
        # forwards whose attention logits came from the operator (not the exact collection passes of the
        # calibration, not the exact fast path) and their similarity entries (B·H·Tq·Tk): plain counters, not state
        self.op_calls = 0
        self.op_pairs = 0

    def extra_repr(self) -> str:
        return (f"operator={self.op.name}, mixer={self.mixer}, heads={self.num_heads}, kv_heads={self.kv_heads}, "
                f"key_bias={self.key_bias}, dim_scales={self.dim_scales}")

    def input_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full per-dimension scales ``([H, D], [H_kv, D])`` of q and k (pairs expanded); ones without dim_scales."""
        if not self.dim_scales:
            return (self.alpha.new_ones(self.num_heads, self.head_dim),
                    self.alpha.new_ones(self.kv_heads, self.head_dim))

        def full(t):
            return torch.cat([t, t], -1) if t.shape[-1] != self.head_dim else t

        return full(self.q_scale), full(self.k_scale)

    def forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0):
        n_rep = query.shape[1] // key.shape[1]
        key_in, q_scale = key, None
        if self.dim_scales:
            q_scale, k_scale = self.input_scales()
            key_in = key * k_scale.view(1, self.kv_heads, 1, -1).to(key.dtype)
        key, key_in, value = _repeat_heads(key, n_rep), _repeat_heads(key_in, n_rep), _repeat_heads(value, n_rep)
        calibrated = bool(self.calibrated)
        if self.op.name == "exact" and not calibrated and self.collector is None and q_scale is None:
            logits = torch.matmul(query, key.transpose(2, 3)) * scaling  # HF eager, op for op
        else:
            q, scale = query, scaling
            if scaling == 1.0 and getattr(module, "scaling", 1.0) != 1.0:  # OPT pre-scales q
                q, scale = query / module.scaling, float(module.scaling)
            qb, kb = q, key_in
            if q_scale is not None:
                qb = q * q_scale.view(1, self.num_heads, 1, -1).to(q.dtype)
            sim = self.op.sim(qb, kb) * scale
            knorm = None  # ‖k‖₁·scale [B, H, 1, Tk]: only the calibration statistics and the key bias use it
            if self.collector is not None or (calibrated and self.key_bias):
                knorm = kb.abs().sum(-1).unsqueeze(-2) * scale
            if self.collector is None:
                self.op_calls += 1
                self.op_pairs += sim.numel()
            if self.collector is not None:
                # calibration pass: record (operator, exact) pairs, continue with the exact attention so that
                # every layer sees the original model's activations
                logits = torch.matmul(q, key.transpose(2, 3)) * scale
                self.collector.add(self, sim, knorm, logits, attention_mask)
            elif calibrated:
                h = (1, -1, 1, 1)
                logits = self.alpha.view(h) * sim + self.beta.view(h)
                if self.key_bias:
                    logits = logits + self.gamma.view(h) * knorm
            else:
                logits = sim
        record_attention(self, query.shape, key.shape[-2], calibrated)
        if attention_mask is not None:
            logits = logits + attention_mask
        probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
        out = mix(probs, value, self.mixer).transpose(1, 2).contiguous()
        return out, probs


def wip_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """The function registered as ``"wip"``: delegates to ``module.wip`` (set by :func:`swap_attention`)."""
    wip = getattr(module, "wip", None)
    if not isinstance(wip, WipAttention):
        raise RuntimeError(f"{type(module).__name__} has no WipAttention child; apply swap_attention to the "
                           "whole model, not to a copy of its config")
    return wip(module, query, key, value, attention_mask, scaling, dropout)


def _dispatches_through_interface(module: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention module; ValueError naming a class that cannot be swapped.

    An attention module is one whose class name ends in ``Attention`` and that has Linear children; it is
    swappable when its ``forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``.
    """
    found = [(n, m) for n, m in model.named_modules()
             if type(m).__name__.lower().endswith("attention") and not isinstance(m, WipAttention)
             and any(isinstance(c, nn.Linear) for c in m.children())]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module to swap (looked for modules whose "
                         "class name ends in 'Attention')")
    bad = sorted({type(m).__name__ for _, m in found if not _dispatches_through_interface(m)})
    if bad:
        raise ValueError(f"cannot swap the attention of {type(model).__name__}: {', '.join(bad)} does not call "
                         "transformers' ALL_ATTENTION_FUNCTIONS; supported: HF attention modules written against "
                         "the attention interface (OPT, Qwen3, LLaMA, ...)")
    return found


def _num_heads(module: nn.Module, config) -> int:
    for owner, attr in ((module, "num_heads"), (config, "num_attention_heads")):
        value = getattr(owner, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}")


def _head_dim(module: nn.Module, config, heads: int) -> int:
    value = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // heads


def _kv_heads(module: nn.Module, config, heads: int) -> int:
    value = getattr(config, "num_key_value_heads", None)
    return value if isinstance(value, int) and value > 0 else heads


def swap_attention(model: nn.Module, operator: str = "minprod", mixer: str = "exact",
                   key_bias: bool = False, dim_scales: bool = False) -> nn.Module:
    """Give every attention module of ``model`` a fresh (uncalibrated) :class:`WipAttention`; returns ``model``.

    ``dim_scales`` adds trainable per-dimension input scales of the operator (see :class:`WipAttention`).

    Swapping twice replaces the previous operator. ValueError for an unknown operator/mixer or a model whose
    attention does not use the HF attention interface.
    """
    get_operator(operator)
    check_mixer(mixer)
    modules = attention_modules(model)
    register_attention_function()
    configs = {id(model.config): model.config} if hasattr(model, "config") else {}
    for _, m in modules:
        config = getattr(m, "config", None)
        if config is None:
            raise ValueError(f"cannot swap the attention of {type(m).__name__}: it has no config to select the "
                             "attention implementation with")
        configs[id(config)] = config
        ref = next(m.parameters())
        heads = _num_heads(m, config)
        m.wip = WipAttention(operator, heads, mixer, key_bias, _head_dim(m, config, heads), dim_scales,
                             _kv_heads(m, config, heads)).to(ref.device)
    for config in configs.values():
        config._attn_implementation = IMPLEMENTATION
    return model


def wip_modules(model: nn.Module) -> list[WipAttention]:
    """The :class:`WipAttention` children of a swapped model, in order."""
    return [m for m in model.modules() if isinstance(m, WipAttention)]


def operator_counts(model: nn.Module) -> dict[str, int]:
    """``{"calls": …, "pairs": …}`` summed over the :class:`WipAttention` layers: forwards whose logits the
    operator computed (counted since the swap) and their similarity entries."""
    wips = wip_modules(model)
    return {"calls": sum(w.op_calls for w in wips), "pairs": sum(w.op_pairs for w in wips)}

