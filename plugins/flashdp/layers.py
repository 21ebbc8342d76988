"""DP versions of the layers a model is made of: the backward clips per sample, sums, adds noise.

A layer is made private by swapping its class for a subclass (parameters, names and state_dict unchanged) whose
forward calls an `autograd.Function`. Its backward computes each sample's gradient of the layer's parameters,
that gradient's norm, the clip factor min(1, C / (norm + 1e-6)), the batch sum of clipped gradients and Gaussian
noise N(0, noise_std²) — in one pass, never holding B × out × in (`plait.kernels.dp_clip`). The optimizer then
sees an already private gradient, so any torch optimizer works unchanged.

Layer kinds (module kind → what its backward hands to `_dispatch`):

* ``linear`` (nn.Linear), ``conv1d`` (HF GPT-2 Conv1D): activations a (B, T, in), output grads g (B, T, out); a
  2-D input is T = 1, or — when the rows are B·T with T the token count of the model's input (OPT flattens its
  tokens before fc1/fc2) — regrouped to (B, T, ·), batch-major.
* ``embedding`` (nn.Embedding and the subclasses in `EXACT_SUBCLASSES`, whose own forward is kept: OPT's learned
  positions add their offset and read ``position_ids``, Gemma3 scales the rows): ids (B, T), g (B, T, d).
* ``layernorm``, ``rmsnorm`` (torch's and HF's weight-only RMSNorms), ``groupnorm``: the normalised input x̂ and
  g, per sample Σ_t g_t ⊙ x̂_t (weight) and Σ_t g_t (bias). An RMSNorm keeps its own forward: it runs with the
  weight set to ones (giving x̂ exactly as the model computes it, e.g. HF's fp32 upcast) and is then scaled.
* ``conv`` (nn.Conv1d, nn.Conv2d; any stride, padding mode, dilation and groups, depthwise included): the input
  unfolded to patches (B, G, L, in/G·k) and g (B, G, L, out/G); groups = 1 is the linear case over the L output
  positions, groups > 1 forms each sample's (G, out/G, in/G·k) gradient a block of samples at a time.
* ``mha`` (nn.MultiheadAttention): its forward is re-written around two DP linear maps, the packed in-projection
  (one clip group per tensor: in_proj_weight, in_proj_bias) and out_proj; torch's own forward reads
  ``out_proj.weight`` directly, so a swapped out_proj alone would never run.
* ``broadcast``: a raw parameter of shape (1, …) that the model broadcasts over the batch (a ViT's position
  embedding, its class token) is handed out, during the model's forward, expanded to (B, …) through an
  autograd.Function: its gradient then arrives one row per sample.

Per-layer mode: each parameter tensor of each layer is one clip group with its own threshold.
Flat mode (`DPContext.flat`): the backward only records per-sample squared norms (ghost norms where
2T² < in·out, else instantiated) and keeps the tensors; `DPContext.finish_flat` then clips every layer with the
global factor (Book-Keeping style: one backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plait.kernels import dp_clip

from .mechanism import SEED_MOD

EPS = 1e-6
# Seeds are reduced into [0, 2**63 - 1): what torch.Generator and the Triton Philox kernel accept. (A CPU
# torch.Generator keys on only the low 32 bits; CUDA's Philox and the Triton kernel use all of them.)
_BLOCK_ELEMS = 1 << 22  # per-sample gradients of a grouped convolution held at once (4M elements)

# nn.Embedding subclasses with their own forward that are handled exactly: the subclass's forward is kept and
# its call to nn.Embedding.forward (``super().forward(ids)``) lands in the DP lookup. Any other subclass with
# its own forward is refused by name (replacing its forward would change the model). Every DP parameter also
# carries a hook that refuses a gradient arriving outside its DP layer, so a future version of these classes
# that read ``self.weight`` directly fails loudly instead of leaking an unclipped gradient.
EXACT_SUBCLASSES = {
    "transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding": "embedding",
    "transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding": "embedding",
}

SUPPORTED = ("Linear, GPT-2 Conv1D, Embedding (incl. OPT's learned positions), LayerNorm, RMSNorm, GroupNorm, "
             "Conv1d, Conv2d, MultiheadAttention, (1, …) parameters broadcast over the batch")


@dataclass
class Group:
    """One clip group: a parameter tensor as used by one layer."""

    name: str
    param: torch.nn.Parameter
    threshold: float
    index: int
    noise_transposed: bool = False  # its layer draws the noise in the transposed shape (GPT-2 Conv1D's weight)


@dataclass
class DPContext:
    """State shared by every DP layer of a model during one step."""

    noise_std: float = 0.0  # absolute std on each summed coordinate (σ · C_total)
    seed: int = 0  # noise seed of the current step
    flat: bool = False
    flat_threshold: float = 1.0
    batch: int | None = None  # samples in the current forward (set by a model forward pre-hook)
    tokens: int | None = None  # tokens per sample of that forward (token-id inputs (B, T)), else None
    groups: list = field(default_factory=list)
    # flat mode book-keeping for the current step
    norms_sq: torch.Tensor | None = None
    pending: list = field(default_factory=list)  # [(group, per-sample part), …] per layer backward
    last_norms: dict = field(default_factory=dict)  # group index -> per-sample norms (diagnostics, tests)
    seen: set = field(default_factory=set)  # group indices whose backward ran this step
    in_forward: int = 0  # depth of model forwards in progress (broadcast parameters expand only inside)
    broadcast: dict = field(default_factory=dict)  # this forward's expanded broadcast parameters

    def new_step(self) -> None:
        self.norms_sq = None
        self.pending.clear()
        self.last_norms.clear()
        self.seen.clear()

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
        for parts in self.pending:
            for group, part in parts:
                grad, _ = part.clipped_sum(self, group, factors)
                accumulate(group.param, grad)
        self.pending.clear()
        self.norms_sq = None
        return norms


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation for half types; fp64 stays fp64 (exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def _per_feature(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, …, *param_shape) → (B, S, n): the S positions at which a parameter of n elements acts elementwise."""
    return x.reshape(x.shape[0], -1, n)


def _factors(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    return (threshold / (norms + EPS)).clamp(max=1.0)


def accumulate(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    # tied parameters (lm_head = embedding) receive one private contribution per layer that uses them
    grad = grad.reshape(param.shape).to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad


# --- one parameter's per-sample gradients, as a layer's backward hands them over ---------------------------------
class _Vector:
    """Per-sample gradients held whole, (B, numel): biases, norm weights, broadcast parameters."""

    def __init__(self, per_sample: torch.Tensor):
        self.x = per_sample

    def norms(self) -> torch.Tensor:
        return self.x.norm(dim=1)

    def clipped_sum(self, ctx: DPContext, group: Group, factors):
        norms = None
        if factors is None:
            norms = self.norms()
            factors = _factors(norms, group.threshold)
        s = (self.x * factors.view(-1, 1).to(self.x.dtype)).sum(0)
        return s + ctx.noise_like(s, group), norms


class _Outer:
    """Σ_t g_t a_tᵀ per sample (Linear, Conv1D, Conv2d with groups = 1): `plait.kernels.dp_clip`."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, transpose: bool = False):
        self.a, self.g, self.transpose = a, g, transpose

    def norms(self) -> torch.Tensor:
        return dp_clip.per_sample_norms(self.a, self.g)

    def clipped_sum(self, ctx: DPContext, group: Group, factors):
        thr = group.threshold if factors is None else 1.0
        grad, norms = dp_clip.clip_sum(self.a, self.g, thr, noise_std=ctx.noise_std, seed=ctx.group_seed(group),
                                       factors=factors)
        return (grad.t() if self.transpose else grad), norms


class _GroupedOuter:
    """Grouped convolution, a (B, G, L, ki), g (B, G, L, ko): sample b's gradient is (G, ko, ki), formed for a block
    of samples at a time (≤ 4M elements, as dp_clip's instantiation path) and clipped and summed in that pass."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a, self.g = a, g
        self.acc = _acc_dtype(a, g)

    def _blocks(self):
        B, G, _, ki = self.a.shape
        blk = max(1, min(B, _BLOCK_ELEMS // max(1, G * ki * self.g.shape[-1])))
        for s in range(0, B, blk):
            yield s, torch.einsum("bglo,bgli->bgoi", self.g[s:s + blk].to(self.acc), self.a[s:s + blk].to(self.acc))

    def norms(self) -> torch.Tensor:
        out = torch.empty(self.a.shape[0], dtype=self.acc, device=self.a.device)
        for s, per in self._blocks():
            out[s:s + per.shape[0]] = per.flatten(1).norm(dim=1)
        return out

    def clipped_sum(self, ctx: DPContext, group: Group, factors):
        norms = None
        if factors is not None:  # book-keeping: one contraction over the B·L rows
            gf = self.g.to(self.acc) * factors.to(self.acc).view(-1, 1, 1, 1)
            grad = torch.einsum("bglo,bgli->goi", gf, self.a.to(self.acc))
        else:
            _, G, _, ki = self.a.shape
            grad = torch.zeros(G, self.g.shape[-1], ki, dtype=self.acc, device=self.a.device)
            norms = torch.empty(self.a.shape[0], dtype=self.acc, device=self.a.device)
            for s, per in self._blocks():
                n = per.flatten(1).norm(dim=1)
                norms[s:s + per.shape[0]] = n
                grad += torch.einsum("b,bgoi->goi", _factors(n, group.threshold), per)
        return grad + ctx.noise_like(grad, group), norms


class _EmbeddingRows:
    def __init__(self, ids: torch.Tensor, g: torch.Tensor, num: int):
        self.ids, self.g, self.num = ids, g, num

    def norms(self) -> torch.Tensor:
        return _embedding_norms(self.ids, self.g)

    def clipped_sum(self, ctx: DPContext, group: Group, factors):
        norms = None
        if factors is None:
            norms = self.norms()
            factors = _factors(norms, group.threshold)
        g = _acc(self.g)
        out = torch.zeros(self.num, g.shape[-1], dtype=g.dtype, device=g.device)
        out.index_add_(0, self.ids.reshape(-1), (g * factors.to(g.dtype).view(-1, 1, 1)).reshape(-1, g.shape[-1]))
        return out + ctx.noise_like(out, group), norms


def _embedding_norms(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t onehot(id_t) g_tᵀ‖_F per sample = sqrt(Σ_{t,s} [id_t = id_s] g_t·g_s) (ghost form, no V × d)."""
    g = _acc(g)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # (B, T, T)
    gram = torch.bmm(g, g.transpose(1, 2))
    return (same * gram).sum((1, 2)).clamp_min(0).sqrt()


def _parts(kind: str, gw: Group | None, gb: Group | None, tensors) -> list:
    """[(group, per-sample part)] of one layer's backward."""
    out = []
    if kind in ("linear", "conv1d"):
        a, g = tensors
        if gw is not None:
            out.append((gw, _Outer(a, g, transpose=kind == "conv1d")))
        if gb is not None:
            out.append((gb, _Vector(_acc(g).sum(1))))
    elif kind == "embedding":
        out.append((gw, _EmbeddingRows(*tensors)))
    elif kind == "norm":  # y = x̂ ⊙ w + b elementwise; x̂, g (B, S, n)
        xhat, g = tensors
        if gw is not None:
            out.append((gw, _Vector((_acc(g) * _acc(xhat)).sum(1))))
        if gb is not None:
            out.append((gb, _Vector(_acc(g).sum(1))))
    elif kind == "conv":  # a (B, G, L, ki), g (B, G, L, ko)
        a, g = tensors
        if gw is not None:
            out.append((gw, _Outer(a[:, 0], g[:, 0]) if a.shape[1] == 1 else _GroupedOuter(a, g)))
        if gb is not None:
            out.append((gb, _Vector(_acc(g).sum(2).flatten(1))))
    elif kind == "vector":
        out.append((gw, _Vector(_acc(tensors[0]))))
    else:
        raise ValueError(f"unknown DP layer kind {kind!r}")
    return out


def _sample_rows(ctx: DPContext, kind: str, name: str, tensors):
    """The layer's tensors with one leading row per sample, or an error: never a silent under-clipped sum."""
    rows = tensors[0].shape[0] if kind == "vector" else tensors[1].shape[0]
    if ctx.batch is None or rows == ctx.batch:
        return tensors
    B, T = ctx.batch, ctx.tokens
    if kind in ("linear", "conv1d", "norm", "embedding") and T and rows == B * T and tensors[1].shape[1] == 1:
        # the model flattened its (B, T) tokens to B·T rows, batch-major (OPT's MLP: hidden.reshape(-1, d))
        return tuple(t.reshape(B, T * t.shape[1], *t.shape[2:]) if isinstance(t, torch.Tensor) else t
                     for t in tensors)
    # e.g. an input broadcast over the batch: its gradient is already summed over samples, so clipping it
    # would not bound any one sample's contribution
    raise RuntimeError(f"DP layer of '{name}' saw {rows} rows for a batch of {B}: per-sample gradients "
                       f"are not available for this layer; freeze it or add it to grad_transform.skip")


def _dispatch(ctx: DPContext, kind, gw, gb, tensors) -> None:
    if gw is None and gb is None:
        return
    tensors = _sample_rows(ctx, kind, (gw or gb).name, tensors)
    for group in (gw, gb):
        if group is None:
            continue
        if group.index in ctx.seen:
            # clipping each call's gradient separately would let one sample move the tensor by a multiple of C_k
            raise RuntimeError(f"DP layer of '{group.name}' ran its backward twice in one step (the module is called "
                               f"more than once per forward, or two backwards ran without the transform): its "
                               f"per-sample gradient would be clipped per call, not per sample")
        ctx.seen.add(group.index)
    parts = _parts(kind, gw, gb, tensors)
    if ctx.flat:
        ctx.add_norms(sum(part.norms().pow(2) for _, part in parts))
        ctx.pending.append(parts)
        return
    for group, part in parts:
        grad, norms = part.clipped_sum(ctx, group, None)
        ctx.last_norms[group.index] = norms
        accumulate(group.param, grad)


def _autocast_input(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The layer input as the autocast matmul saw it. Under autocast a LayerNorm-fed input is saved in fp32
    while the output grad is bf16/fp16; the non-private weight grad multiplies the half-precision copy, and so
    must the per-sample grads — a mixed fp32/half pair would also push the Triton kernel onto exact fp32 dots
    instead of tensor cores."""
    if grad_out.dtype in (torch.float16, torch.bfloat16) and x.dtype == torch.float32:
        return x.to(grad_out.dtype)
    return x


# --- autograd functions -------------------------------------------------------------------------------------
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
        n = math.prod(layer.normalized_shape)
        _dispatch(layer._dp_ctx, "norm", layer._dp_w, layer._dp_b,
                  (_per_feature(xhat.detach(), n), _per_feature(grad_out, n)))
        return grad_x, None, None, None


class _ScaleFn(torch.autograd.Function):
    """y = w ⊙ u with u the module's own output at w = 1 (a weight-only RMSNorm): per sample Σ_t g_t ⊙ u_t."""

    @staticmethod
    def forward(ctx, u, weight, layer):
        ctx.save_for_backward(u, weight)
        ctx.layer = layer
        return weight * u  # the operand order of HF's `self.weight * hidden_states.to(input_dtype)`

    @staticmethod
    def backward(ctx, grad_out):
        u, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_u = (grad_out * weight).to(u.dtype) if ctx.needs_input_grad[0] else None
        n = weight.numel()
        _dispatch(layer._dp_ctx, "norm", layer._dp_w, None, (_per_feature(u, n), _per_feature(grad_out, n)))
        return grad_u, None, None


class _ChannelAffineFn(torch.autograd.Function):
    """GroupNorm's affine step y = x̂ · w[c] + b[c] on (B, C, *): per sample Σ_spatial g ⊙ x̂ and Σ_spatial g."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, layer):
        ctx.save_for_backward(xhat, weight)
        ctx.layer = layer
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        y = xhat * weight.view(shape)
        return y + bias.view(shape) if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        layer = ctx.layer
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        grad_x = grad_out * weight.view(shape).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        B, C = grad_out.shape[:2]
        _dispatch(layer._dp_ctx, "norm", layer._dp_w, layer._dp_b,
                  (xhat.reshape(B, C, -1).transpose(1, 2), grad_out.reshape(B, C, -1).transpose(1, 2)))
        return grad_x, None, None, None


class _ConvFn(torch.autograd.Function):
    """F.conv1d / F.conv2d with numeric padding (the module forward pads other modes and 'same' itself)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.conf = layer, (stride, padding, dilation, groups)
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            fn = torch.nn.grad.conv1d_input if weight.dim() == 3 else torch.nn.grad.conv2d_input
            grad_x = fn(x.shape, weight.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
        if layer._dp_w is not None or layer._dp_b is not None:
            _dispatch(layer._dp_ctx, "conv", layer._dp_w, layer._dp_b,
                      _conv_rows(_autocast_input(x, grad_out), grad_out, weight, stride, padding, dilation, groups))
        return grad_x, None, None, None, None, None, None, None


def _conv_rows(x, g, weight, stride, padding, dilation, groups):
    """Unfolded input patches a (B, G, L, in/G·k) and output grads g (B, G, L, out/G) of a convolution."""
    if weight.dim() == 3:  # Conv1d as a Conv2d of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel = (1, weight.shape[2])
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    else:
        kernel = tuple(weight.shape[2:])
    B, cout = x.shape[0], g.shape[1]
    a = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C_in·k, L), channel-major
    L = a.shape[2]
    return (a.view(B, groups, -1, L).transpose(2, 3), g.reshape(B, groups, cout // groups, L).transpose(2, 3))


class _BroadcastFn(torch.autograd.Function):
    """A (1, …) parameter expanded to (B, …): its gradient comes back one row per sample."""

    @staticmethod
    def forward(ctx, param, batch, group, dpctx):
        ctx.group, ctx.dpctx = group, dpctx
        return param.expand(batch, *param.shape[1:])

    @staticmethod
    def backward(ctx, grad_out):
        _dispatch(ctx.dpctx, "vector", ctx.group, None, (grad_out.reshape(grad_out.shape[0], -1),))
        return None, None, None, None


# --- module forwards -----------------------------------------------------------------------------------------
def _linear_forward(self, x):
    return _LinearFn.apply(x, self.weight, self.bias, self)


def _conv1d_forward(self, x):
    return _Conv1DFn.apply(x, self.weight, self.bias, self)


def _embedding_forward(self, ids):
    return _EmbeddingFn.apply(ids, self.weight, self)


def _layernorm_forward(self, x):
    return _LayerNormFn.apply(x, self.weight, self.bias, self)


def _call_with_weight(module: nn.Module, weight: torch.Tensor, base: type, *args):
    """``base.forward(module, *args)`` with ``module.weight`` temporarily replaced by ``weight``."""
    saved = module._parameters["weight"]
    module._parameters["weight"] = weight
    try:
        return base.forward(module, *args)
    finally:
        module._parameters["weight"] = saved


def _rmsnorm_forward(self, x):
    u = _call_with_weight(self, torch.ones_like(self.weight), self._dp_base, x)  # the module's x̂, bit for bit
    return _ScaleFn.apply(u, self.weight, self)


def _groupnorm_forward(self, x):
    xhat = F.group_norm(x, self.num_groups, None, None, self.eps)
    return _ChannelAffineFn.apply(xhat, self.weight, self.bias, self)


def _conv_forward(self, x):
    nd = len(self.kernel_size)
    padding = self.padding
    if self.padding_mode != "zeros":
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = (0,) * nd
    elif isinstance(padding, str):
        total = [0] * nd if padding == "valid" else [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        if any(t % 2 for t in total):  # 'same' with an even kernel: the extra row/column goes after, as in torch
            pads = []
            for t in reversed(total):
                pads += [t // 2, t - t // 2]
            x = F.pad(x, pads)
            padding = (0,) * nd
        else:
            padding = tuple(t // 2 for t in total)
    return _ConvFn.apply(x, self.weight, self.bias, self, tuple(self.stride), tuple(padding), tuple(self.dilation),
                         self.groups)


def _float_mask(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention (packed in-projection, no bias_k/bias_v, no zero attention) with DP projections."""
    if query.dim() != 3:
        raise RuntimeError("DP MultiheadAttention needs batched inputs (3-D query, key and value)")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    packed = query is key and key is value
    if not self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, Tq, E = query.shape
    Tk, h = key.shape[1], self.num_heads
    hd = E // h
    if packed:
        q, k, v = _LinearFn.apply(query, self.in_proj_weight, self.in_proj_bias, self).chunk(3, -1)
    else:
        # one DP linear map over the concatenated rows: sample b's gradient of the packed weight is then
        # [g_qᵀ x_q; g_kᵀ x_k; g_vᵀ x_v] exactly (the unused blocks of each row get zero output gradient)
        y = _LinearFn.apply(torch.cat([query, key, value], 1), self.in_proj_weight, self.in_proj_bias, self)
        q, k, v = y[:, :Tq, :E], y[:, Tq:Tq + Tk, E:2 * E], y[:, Tq + Tk:, 2 * E:]
    q = q.reshape(B, Tq, h, hd).transpose(1, 2)
    k = k.reshape(B, Tk, h, hd).transpose(1, 2)
    v = v.reshape(B, Tk, h, hd).transpose(1, 2)
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, Tq, Tk) if mask.dim() == 2 else mask.view(B, h, Tq, Tk)
    kpm = _float_mask(key_padding_mask, q.dtype)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, Tk)
        mask = kpm if mask is None else mask + kpm
    p = self.dropout if self.training else 0.0
    weights = None
    if need_weights:
        scores = (q * hd ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        w = scores.softmax(-1)
        if p > 0:
            w = F.dropout(w, p)
        out = w @ v
        weights = w.mean(1) if average_attn_weights else w
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    out = _LinearFn.apply(out.transpose(1, 2).reshape(B, Tq, E), self.out_proj.weight, self.out_proj.bias,
                          self.out_proj)
    return (out if self.batch_first else out.transpose(0, 1)), weights


def _broadcast_getattr(self, name):
    value = self._dp_base.__getattr__(self, name)
    groups = self.__dict__.get("_dp_broadcast")
    if groups is not None and name in groups:
        ctx = self.__dict__["_dp_ctx"]
        if ctx.in_forward and ctx.batch and torch.is_grad_enabled() and value.requires_grad:
            key = (id(self), name)
            out = ctx.broadcast.get(key)
            if out is None:  # one node per forward: every use of the tensor sums into the same per-sample rows
                out = ctx.broadcast[key] = _BroadcastFn.apply(value, ctx.batch, groups[name], ctx)
            return out
    return value


# --- which modules, and how they are swapped -----------------------------------------------------------------------
_FORWARDS = {"linear": _linear_forward, "conv1d": _conv1d_forward, "embedding": _embedding_forward,
             "layernorm": _layernorm_forward, "rmsnorm": _rmsnorm_forward, "groupnorm": _groupnorm_forward,
             "conv": _conv_forward, "mha": _mha_forward}
_DP_CLASSES: dict[type, type] = {}
_BROADCAST_CLASSES: dict[type, type] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _weight_only(module: nn.Module) -> bool:
    return [n for n, _ in module.named_parameters(recurse=False)] == ["weight"] and not list(module.children())


def supported_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm") and _weight_only(module)):
        return "rmsnorm"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return "conv1d"
    return None


def layer_params(module: nn.Module, kind: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name relative to the module, parameter) of the tensors a DP layer of this kind clips, in group order."""
    if kind == "mha":
        names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    elif kind == "rmsnorm":
        names = ["weight"]
    else:
        names = ["weight", "bias"]
    out = []
    for n in names:
        owner, _, attr = n.rpartition(".")
        p = getattr(module.get_submodule(owner) if owner else module, attr, None)
        if isinstance(p, nn.Parameter):
            out.append((n, p))
    return out


def _base_class(module: nn.Module, kind: str) -> type | None:
    for base in {"linear": (nn.Linear,), "embedding": (nn.Embedding,), "layernorm": (nn.LayerNorm,),
                 "groupnorm": (nn.GroupNorm,), "conv": (nn.Conv1d, nn.Conv2d), "mha": (nn.MultiheadAttention,),
                 }.get(kind, ()):
        if isinstance(module, base):
            return base
    return None


def refusal(module: nn.Module, kind: str) -> str | None:
    """Why this layer's forward cannot be replaced (a subclass with its own forward), or None."""
    cls, base = type(module), _base_class(module, kind)
    if base is None or _qualname(cls) in EXACT_SUBCLASSES:
        return None
    own = cls.forward is not base.forward or (kind == "conv" and cls._conv_forward is not base._conv_forward)
    if own:
        return (f"is a {cls.__name__}, an nn.{base.__name__} subclass with its own forward: DP would replace that "
                f"forward (a different model), and it has no exact DP version")
    return None


def exact_possible(module: nn.Module, kind: str) -> bool:
    """False for a configuration of a supported kind that the DP version does not reproduce exactly (the
    layer's parameters are then treated as unsupported: frozen or refused)."""
    if kind == "mha":
        return module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
    if kind == "rmsnorm":
        return _scales_by_weight(module)
    return True


def _scales_by_weight(module: nn.Module) -> bool:
    """Probe: is the module's output w ⊙ (its output at w = 1)? (HF Llama/Qwen RMSNorm and torch's are; Gemma's
    (1 + w) form is not.)"""
    w = module.weight
    if w is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3,) + tuple(w.shape), generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
    r = (torch.rand(tuple(w.shape), generator=gen, dtype=torch.float64) + 0.5).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            ones = _call_with_weight(module, torch.ones_like(w), type(module), x)
            scaled = _call_with_weight(module, r, type(module), x)
    except Exception:  # noqa: BLE001 - any failure means: not this form
        return False
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return torch.allclose(scaled.double(), (r * ones).double(), rtol=tol, atol=tol * 1e-3)


def make_private_layer(module: torch.nn.Module, kind: str, ctx: DPContext, gw: Group | None,
                       gb: Group | None, extra: tuple | None = None) -> None:
    """Swap ``module``'s class for its DP subclass (in place). ``extra``: out_proj's (weight, bias) groups (mha)."""
    cls = type(module)
    if cls not in _DP_CLASSES:
        if _qualname(cls) in EXACT_SUBCLASSES:
            # keep the subclass's forward; its super().forward(...) resolves to the DP base inserted in the MRO
            inner = type(f"_DP{_base_class(module, kind).__name__}", (_base_class(module, kind),),
                         {"forward": _FORWARDS[kind]})
            _DP_CLASSES[cls] = type(f"DP{cls.__name__}", (cls, inner), {"_dp_base": cls})
        else:
            _DP_CLASSES[cls] = type(f"DP{cls.__name__}", (cls,), {"forward": _FORWARDS[kind], "_dp_base": cls})
    module.__class__ = _DP_CLASSES[cls]
    module._dp_ctx, module._dp_w, module._dp_b = ctx, gw, gb
    if kind == "mha":
        module.out_proj._dp_ctx, (module.out_proj._dp_w, module.out_proj._dp_b) = ctx, (extra or (None, None))


def broadcast_candidate(module: nn.Module, name: str, param: torch.nn.Parameter) -> bool:
    """A raw (1, …) parameter of a model-level module (not a torch.nn layer's weight or bias): the model is
    assumed to combine it with each sample by broadcasting over dim 0 (x + pos_embed, cls_token.expand(B, …)).
    Indexing its dim 0 (p[0]) would break that assumption; reshaping it fails loudly."""
    return (param.dim() >= 2 and param.shape[0] == 1 and name not in ("weight", "bias")
            and not type(module).__module__.startswith("torch.nn") and not hasattr(module, "_dp_base"))


def make_broadcast_owner(module: nn.Module, ctx: DPContext, groups: dict[str, Group]) -> None:
    cls = type(module)
    if cls not in _BROADCAST_CLASSES:
        _BROADCAST_CLASSES[cls] = type(f"DP{cls.__name__}", (cls,), {"__getattr__": _broadcast_getattr,
                                                                    "_dp_base": cls})
    module.__class__ = _BROADCAST_CLASSES[cls]
    module._dp_ctx, module._dp_broadcast = ctx, dict(groups)


def mixes_samples(module: nn.Module) -> str | None:
    """Why a layer couples the samples of a batch (so no per-sample gradient exists), or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
        return ("normalises with the statistics of the whole batch, so one sample's gradient depends on the others "
                "and cannot be clipped per sample: replace it with nn.GroupNorm (e.g. GroupNorm(min(32, C), C)), "
                "which normalises each sample alone")
    return None


def guard_param(name: str, param: torch.nn.Parameter):
    """A hook that refuses any gradient autograd delivers to a DP parameter: DP layers hand theirs over clipped
    and noised (autograd sees None), so a non-None gradient came through some other use of the tensor."""

    def hook(grad):
        if grad is not None:
            raise RuntimeError(f"flashdp: parameter '{name}' received a gradient outside its DP layer (the model "
                               f"uses the tensor directly, e.g. F.linear(x, self.weight)): it would be neither "
                               f"clipped nor noised; freeze it or add its module to grad_transform.skip")
        return grad

    return param.register_hook(hook)


def total_threshold(groups: list[Group]) -> float:
    """Sensitivity of the per-layer mechanism: sqrt(Σ_k C_k²)."""
    return math.sqrt(sum(g.threshold ** 2 for g in groups))
