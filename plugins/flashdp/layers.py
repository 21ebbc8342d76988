"""DP versions of Linear, GPT-2 Conv1D, Embedding and LayerNorm: the backward clips per sample, sums, adds noise.

A layer is made private by swapping its class for a subclass (parameters, names and state_dict unchanged) whose
forward calls an `autograd.Function`. Its backward computes each sample's gradient of the layer's weight (and
bias), that gradient's norm, the clip factor min(1, C / (norm + 1e-6)), the batch sum of clipped gradients and
Gaussian noise N(0, noise_std²) — in one pass, never holding B × out × in (`plait.kernels.dp_clip`). The
optimizer then sees an already private gradient, so any torch optimizer works unchanged.

Shapes: activations a (B, T, in), output grads g (B, T, out); a 2-D input is T = 1.
Per-layer mode: each parameter tensor of each layer is one clip group with its own threshold.
Flat mode (`DPContext.flat`): the backward only records per-sample squared norms (ghost norms where
2T² < in·out, else instantiated) and keeps (a, g); `DPContext.finish_flat` then clips every layer with the
global factor (Book-Keeping style: one backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from plait.kernels import dp_clip

EPS = 1e-6
# Seeds are reduced into [0, 2**63 - 1): what torch.Generator and the Triton Philox kernel accept. (A CPU
# torch.Generator keys on only the low 32 bits; CUDA's Philox and the Triton kernel use all of them.)
SEED_MOD = 2**63 - 1


@dataclass
class Group:
    """One clip group: a parameter tensor as used by one layer."""

    name: str
    param: torch.nn.Parameter
    threshold: float
    index: int


@dataclass
class DPContext:
    """State shared by every DP layer of a model during one step."""

    noise_std: float = 0.0  # absolute std on each summed coordinate (σ · C_total)
    seed: int = 0  # noise seed of the current step
    flat: bool = False
    flat_threshold: float = 1.0
    batch: int | None = None  # samples in the current forward (set by a model forward pre-hook)
    groups: list = field(default_factory=list)
    # flat mode book-keeping for the current step
    norms_sq: torch.Tensor | None = None
    pending: list = field(default_factory=list)  # (layer_kind, group_w, group_b, tensors...)
    last_norms: dict = field(default_factory=dict)  # group index -> per-sample norms (diagnostics, tests)

    def group_seed(self, group: Group) -> int:
        """This step's noise seed of one clip group (the torch generator and the Triton kernel both use it)."""
        return (self.seed * 1_000_003 + group.index * 7919) % SEED_MOD

    def generator(self, group: Group, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.group_seed(group))
        return g

    def noise_like(self, t: torch.Tensor, group: Group) -> torch.Tensor:
        if self.noise_std == 0.0:
            return torch.zeros_like(t)
        return torch.randn(t.shape, generator=self.generator(group, t.device), device=t.device,
                           dtype=_acc(t).dtype).mul_(self.noise_std).to(t.dtype)

    def add_norms(self, norms_sq: torch.Tensor) -> None:
        self.norms_sq = norms_sq if self.norms_sq is None else self.norms_sq + norms_sq

    def finish_flat(self) -> torch.Tensor | None:
        """Flat mode: clip every recorded layer with the global per-sample factor, sum, add noise."""
        if not self.pending:
            return None
        norms = self.norms_sq.clamp_min(0).sqrt()
        factors = (self.flat_threshold / (norms + EPS)).clamp(max=1.0)
        for kind, gw, gb, tensors in self.pending:
            _clipped_sums(self, kind, gw, gb, tensors, factors=factors)
        self.pending.clear()
        self.norms_sq = None
        return norms


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation for half types; fp64 stays fp64 (exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def _factors(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    return (threshold / (norms + EPS)).clamp(max=1.0)


def accumulate(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    # tied parameters (lm_head = embedding) receive one private contribution per layer that uses them
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad


def _clipped_sums(ctx: DPContext, kind: str, gw: Group | None, gb: Group | None, tensors, factors=None) -> None:
    """Write Σ_b f_b G_b + noise into the groups' .grad for one layer."""
    if kind in ("linear", "conv1d"):
        a, g = tensors
        if gw is not None:
            thr = gw.threshold if factors is None else 1.0
            grad, norms = dp_clip.clip_sum(a, g, thr, noise_std=ctx.noise_std, seed=ctx.group_seed(gw),
                                           factors=factors)
            if factors is None:
                ctx.last_norms[gw.index] = norms
            accumulate(gw.param, grad.t() if kind == "conv1d" else grad)
        if gb is not None:
            h = _acc(g).sum(1)  # (B, out)
            _finish_vector_group(ctx, gb, h, factors)
    elif kind == "embedding":
        ids, g, num = tensors
        per = _embedding_norms(ids, g) if factors is None else None
        f = _factors(per, gw.threshold) if factors is None else factors
        if factors is None:
            ctx.last_norms[gw.index] = per
        out = torch.zeros(num, g.shape[-1], dtype=_acc(g).dtype, device=g.device)
        out.index_add_(0, ids.reshape(-1), (_acc(g) * f.view(-1, 1, 1)).reshape(-1, g.shape[-1]))
        out += ctx.noise_like(out, gw)
        accumulate(gw.param, out)
    elif kind == "layernorm":
        xhat, g = tensors
        if gw is not None:
            _finish_vector_group(ctx, gw, (_acc(g) * _acc(xhat)).sum(1), factors)
        if gb is not None:
            _finish_vector_group(ctx, gb, _acc(g).sum(1), factors)


def _finish_vector_group(ctx: DPContext, group: Group, per_sample: torch.Tensor, factors) -> None:
    """per_sample: (B, n) per-sample gradients of a vector parameter."""
    if factors is None:
        norms = per_sample.norm(dim=1)
        ctx.last_norms[group.index] = norms
        factors = _factors(norms, group.threshold)
    s = (per_sample * factors.view(-1, 1)).sum(0)
    s = s + ctx.noise_like(s, group)
    accumulate(group.param, s.view_as(group.param))


def _embedding_norms(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t onehot(id_t) g_tᵀ‖_F per sample = sqrt(Σ_{t,s} [id_t = id_s] g_t·g_s) (ghost form, no V × d)."""
    g = _acc(g)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # (B, T, T)
    gram = torch.bmm(g, g.transpose(1, 2))
    return (same * gram).sum((1, 2)).clamp_min(0).sqrt()


def _record_flat(ctx: DPContext, kind: str, gw, gb, tensors) -> None:
    """Flat mode: add this layer's per-sample squared norms; keep (a, g) for `finish_flat`."""
    if kind in ("linear", "conv1d"):
        a, g = tensors
        sq = torch.zeros(a.shape[0], dtype=_acc(a).dtype, device=a.device)
        if gw is not None:
            sq = sq + dp_clip.per_sample_norms(a, g).pow(2)
        if gb is not None:
            sq = sq + _acc(g).sum(1).pow(2).sum(1)
    elif kind == "embedding":
        ids, g, _ = tensors
        sq = _embedding_norms(ids, g).pow(2)
    else:
        xhat, g = tensors
        sq = torch.zeros(g.shape[0], dtype=_acc(g).dtype, device=g.device)
        if gw is not None:
            sq = sq + (_acc(g) * _acc(xhat)).sum(1).pow(2).sum(1)
        if gb is not None:
            sq = sq + _acc(g).sum(1).pow(2).sum(1)
    ctx.add_norms(sq)
    ctx.pending.append((kind, gw, gb, tensors))


def _dispatch(ctx: DPContext, kind, gw, gb, tensors) -> None:
    rows = tensors[1].shape[0]
    if ctx.batch is not None and rows != ctx.batch:
        # e.g. an input broadcast over the batch: its gradient is already summed over samples, so clipping it
        # would not bound any one sample's contribution. Never silently wrong.
        name = (gw or gb).name
        raise RuntimeError(f"DP layer of '{name}' saw {rows} rows for a batch of {ctx.batch}: per-sample gradients "
                           f"are not available for this layer; freeze it or add it to grad_transform.skip")
    if ctx.flat:
        _record_flat(ctx, kind, gw, gb, tensors)
    else:
        _clipped_sums(ctx, kind, gw, gb, tensors)


def _autocast_input(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The layer input as the autocast matmul saw it. Under autocast a LayerNorm-fed input is saved in fp32
    while the output grad is bf16/fp16; the non-private weight grad multiplies the half-precision copy, and so
    must the per-sample grads — a mixed fp32/half pair would also push the Triton kernel onto exact fp32 dots
    instead of tensor cores."""
    if grad_out.dtype in (torch.float16, torch.bfloat16) and x.dtype == torch.float32:
        return x.to(grad_out.dtype)
    return x


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        # under autocast the output grad may be bf16/fp16 while the master weight is fp32
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        _dispatch(layer._dp_ctx, "linear", layer._dp_w, layer._dp_b,
                  (_as_3d(_autocast_input(x, grad_out)), _as_3d(grad_out)))
        return grad_x, None, None, None


class _Conv1DFn(torch.autograd.Function):
    """HF GPT-2 Conv1D: y = x @ W + b with W of shape (in, out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_out @ weight.t().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        _dispatch(layer._dp_ctx, "conv1d", layer._dp_w, layer._dp_b,
                  (_as_3d(_autocast_input(x, grad_out)), _as_3d(grad_out)))
        return grad_x, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, layer):
        batch = layer._dp_ctx.batch
        if ids.dim() >= 2 and ids.shape[0] == 1 and batch and batch > 1:
            # position ids shared by the batch (GPT-2's wpe): give each sample its own rows so that the
            # backward sees per-sample gradients (the output broadcasts the same way downstream)
            ids = ids.expand(batch, *ids.shape[1:])
        ctx.save_for_backward(ids)
        ctx.layer = layer
        return F.embedding(ids, weight, layer.padding_idx, layer.max_norm, layer.norm_type,
                           layer.scale_grad_by_freq, layer.sparse)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        ids2 = ids.unsqueeze(1) if ids.dim() == 1 else ids.reshape(ids.shape[0], -1)
        g = grad_out.reshape(ids2.shape[0], ids2.shape[1], -1)
        if layer.padding_idx is not None:  # the padding row gets no gradient in torch either
            g = g.masked_fill((ids2 == layer.padding_idx).unsqueeze(-1), 0.0)
        _dispatch(layer._dp_ctx, "embedding", layer._dp_w, None, (ids2, g, layer.num_embeddings))
        return None, None, None


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight, bias)
        ctx.layer = layer
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        layer = ctx.layer
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            xhat = F.layer_norm(xd, layer.normalized_shape, None, None, layer.eps)
            y = xhat * weight.detach() if weight is not None else xhat
            (grad_x,) = torch.autograd.grad(y, xd, grad_out)
        _dispatch(layer._dp_ctx, "layernorm", layer._dp_w, layer._dp_b,
                  (_as_3d(xhat.detach()), _as_3d(grad_out)))
        return grad_x, None, None, None


def _linear_forward(self, x):
    return _LinearFn.apply(x, self.weight, self.bias, self)


def _conv1d_forward(self, x):
    return _Conv1DFn.apply(x, self.weight, self.bias, self)


def _embedding_forward(self, ids):
    return _EmbeddingFn.apply(ids, self.weight, self)


def _layernorm_forward(self, x):
    return _LayerNormFn.apply(x, self.weight, self.bias, self)


def supported_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    return None


_FORWARDS = {"linear": _linear_forward, "conv1d": _conv1d_forward, "embedding": _embedding_forward,
             "layernorm": _layernorm_forward}
_DP_CLASSES: dict[type, type] = {}


def make_private_layer(module: torch.nn.Module, kind: str, ctx: DPContext, gw: Group | None,
                       gb: Group | None) -> None:
    """Swap ``module``'s class for its DP subclass (in place)."""
    cls = type(module)
    if cls not in _DP_CLASSES:
        _DP_CLASSES[cls] = type(f"DP{cls.__name__}", (cls,), {"forward": _FORWARDS[kind], "_dp_base": cls})
    module.__class__ = _DP_CLASSES[cls]
    module._dp_ctx, module._dp_w, module._dp_b = ctx, gw, gb


def total_threshold(groups: list[Group]) -> float:
    """Sensitivity of the per-layer mechanism: sqrt(Σ_k C_k²)."""
    return math.sqrt(sum(g.threshold ** 2 for g in groups))
