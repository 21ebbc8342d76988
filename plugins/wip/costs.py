"""Operation counter (multiplications vs additions per forward) and an energy estimate from a per-op table.

Counting is done on the executed shapes: inside ``with OpCounter() as counter: model(...)`` every WiP
attention call reports (batch, heads, Tq, Tk, head dim) and every ``nn.Linear`` is hooked, and the counts
are the formulas below, so they describe the arithmetic a multiplication-free datapath would execute, not
the PyTorch emulation (which, e.g., computes ``minprod`` from two L1 distance matrices).

Per attention call, with L = B·H·Tq·Tk logits (the full matrix, as eager attention computes it):

* ``qk``: L·D × the operator's per-pair ops, minus L ``fp_add`` (a row's first accumulate is a move);
* ``prep``: B·H·Tq·D × the operator's per-element prep ops (PoT rounding: 1 compare; Mitchell: 1 int add);
  with ``dim_scales``, B·(H·Tq + H_kv·Tk)·D ``fp_mul`` (q·a, k·b; they fold into the q/k projections of
  OPT/LLaMA-style attention, where they would cost nothing, but are counted as executed here);
* ``scale``: L ``fp_mul`` (× 1/√d; with calibration α·scale is one constant) + L ``fp_add`` for β when
  calibrated; with the key bias also B·H·Tk·(D−1) ``fp_add`` + B·H·Tk ``fp_mul`` (γ·‖k‖₁) + L ``fp_add``;
* ``av``: exact: B·H·Tq·D·Tk ``fp_mul`` and B·H·Tq·D·(Tk−1) ``fp_add``; ``pot`` mixer: the products become
  ``int_add`` (shifts), plus L ``cmp`` (rounding), B·H·Tq·(Tk−1) ``fp_add`` and B·H·Tq·(D+1) ``fp_mul``
  (renormalising by a reciprocal; the division is counted as one multiplication).

Per ``nn.Linear`` call with N rows: N·in·out ``fp_mul``, N·(in−1)·out ``fp_add`` (+ N·out with a bias).
Not counted (identical for every operator): softmax, norms, activations, RoPE, embeddings, residual adds.

Energy (pJ per op, 45 nm, Horowitz, "Computing's energy problem", ISSCC 2014, Fig. 1.1.9; the table used by
AdderNet / ShiftAddViT): FP32 mul 3.7, FP32 add 0.9, INT32 add 0.1; FP16 mul 1.1, add 0.4. A magnitude
compare is an integer compare of the bit patterns (counted as an INT32 add); sign/abs flips are free.
"""
from __future__ import annotations

import contextvars
from collections import defaultdict

import torch
from torch import nn

KINDS = ("fp_mul", "fp_add", "int_add", "cmp")
ENERGY_PJ = {
    "fp32": {"fp_mul": 3.7, "fp_add": 0.9, "int_add": 0.1, "cmp": 0.1},
    "fp16": {"fp_mul": 1.1, "fp_add": 0.4, "int_add": 0.1, "cmp": 0.1},
}
ATTENTION_COMPONENTS = ("qk", "prep", "scale", "av")

_ACTIVE: contextvars.ContextVar[OpCounter | None] = contextvars.ContextVar("wip_op_counter", default=None)


def attention_counts(op, mixer: str, batch: int, heads: int, tq: int, tk: int, d: int, calibrated: bool = False,
                     key_bias: bool = False, dim_scales: bool = False, kv_heads: int | None = None
                     ) -> dict[str, dict[str, int]]:
    """{component: {kind: count}} of one attention call (formulas in the module docstring)."""
    logits = batch * heads * tq * tk
    qk = {kind: logits * d * n for kind, n in op.pair_ops.items()}
    qk["fp_add"] = qk.get("fp_add", 0) - logits
    prep = {kind: batch * heads * tq * d * n for kind, n in op.prep_ops.items()}
    if dim_scales:  # as executed here; zero where they are folded into the q/k projections (docs/wip.md)
        prep["fp_mul"] = prep.get("fp_mul", 0) + batch * (heads * tq + (kv_heads or heads) * tk) * d
    scale = {"fp_mul": logits, "fp_add": 0}
    if calibrated:
        scale["fp_add"] += logits
        if key_bias:
            scale["fp_add"] += batch * heads * tk * (d - 1) + logits
            scale["fp_mul"] += batch * heads * tk
    rows = batch * heads * tq
    if mixer == "exact":
        av = {"fp_mul": rows * d * tk, "fp_add": rows * d * (tk - 1)}
    else:
        av = {"int_add": rows * d * tk, "fp_add": rows * d * (tk - 1) + rows * (tk - 1), "cmp": logits,
              "fp_mul": rows * (d + 1)}
    return {"qk": qk, "prep": prep, "scale": scale, "av": av}


class OpCounter:
    """Context manager accumulating {component: {kind: count}} over the forwards run inside it.

    Components: the attention ones (``qk``, ``prep``, ``scale``, ``av``) and ``linear`` (every nn.Linear
    of the models passed to ``watch``; with ``watch`` not called, linear layers are not counted).
    """

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._token: contextvars.Token | None = None
        self._hooks: list = []

    def watch(self, model: nn.Module) -> OpCounter:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                self._hooks.append(m.register_forward_hook(self._linear_hook))
        return self

    def _linear_hook(self, module: nn.Linear, inputs, output) -> None:
        if _ACTIVE.get() is not self:
            return
        rows = inputs[0].numel() // module.in_features
        self.add("linear", {"fp_mul": rows * module.in_features * module.out_features,
                            "fp_add": rows * (module.in_features - 1) * module.out_features
                            + (rows * module.out_features if module.bias is not None else 0)})

    def add(self, component: str, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            if kind not in KINDS:
                raise ValueError(f"unknown op kind {kind!r}; allowed: {', '.join(KINDS)}")
            self.counts[component][kind] += int(n)

    def __enter__(self) -> OpCounter:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def total(self, components=None) -> dict[str, int]:
        """{kind: count} summed over ``components`` (default: all)."""
        out = {k: 0 for k in KINDS}
        for comp, counts in self.counts.items():
            if components is None or comp in components:
                for kind, n in counts.items():
                    out[kind] += n
        return out

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {c: {k: self.counts[c].get(k, 0) for k in KINDS} for c in sorted(self.counts)}


def record_attention(wip, query_shape: torch.Size, tk: int, calibrated: bool) -> None:
    """Called by WipAttention on every forward; counts only inside an active OpCounter."""
    counter = _ACTIVE.get()
    if counter is None:
        return
    batch, heads, tq, d = query_shape
    for comp, counts in attention_counts(wip.op, wip.mixer, batch, heads, tq, tk, d, calibrated,
                                         wip.key_bias, wip.dim_scales, wip.kv_heads).items():
        counter.add(comp, counts)


def energy_pj(counts: dict[str, int], precision: str = "fp32") -> float:
    """Estimated energy in picojoules of {kind: count} with the Horowitz 45 nm table."""
    if precision not in ENERGY_PJ:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(ENERGY_PJ)}")
    table = ENERGY_PJ[precision]
    return float(sum(table[kind] * n for kind, n in counts.items()))
