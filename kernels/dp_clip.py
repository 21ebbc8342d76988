"""Per-sample clipped, batch-summed, noised weight gradient of a linear layer (FlashDP-style, one op).

Shapes and math
---------------
``a``: (B, T, d_in) layer inputs (activations), ``g``: (B, T, d_out) gradients w.r.t. the layer outputs
(2-D inputs (B, d) are read as T = 1). For each sample b::

    G_b = g_bᵀ a_b                      (d_out, d_in), fp32 accumulation over the T tokens
    n_b = ‖G_b‖_F                        per-sample norm, returned as ``norms`` (B,)
    f_b = min(1, C / (n_b + 1e-6))       clip factor (Opacus' formula)
    W_grad = Σ_b f_b G_b + N(0, noise_std²·I)

``noise_std`` is the *absolute* std added to the summed gradient (σ·C in DP-SGD terms; divide by the
expected batch size afterwards if a mean is wanted). The back-propagated loss must be a sum over samples
(or the caller rescales), otherwise per-sample gradients are 1/B-scaled and the effective threshold is C·B.
For flat / multi-layer clipping the caller computes the per-sample norms over all layers first and passes
``factors`` (B,) instead; the op then only forms Σ_b f_b G_b (+ noise). The bias gradient of a sample is
h_b = Σ_t g_bt (d_out,); :func:`bias_clip_sum_reference` clips, sums and noises it the same way (a
separate clip group with its own threshold, as in per-layer clipping).

Paths
-----
* Pure PyTorch (:func:`clip_sum_reference`): any device, fp32/fp16/bf16/fp64 inputs. Per-sample norms
  either by instantiation — G_b formed for a block of samples at a time (``block_size``, about 16 MB of
  fp32 per block, so B×d_out×d_in is never held at once) and clipped/summed in the same pass — or by the
  ghost norm ‖G_b‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) (2BT²(d_in+d_out) FLOPs instead of 2BT·d_in·d_out)
  followed by one GEMM over the B·T rows, W_grad = (f ⊙ g)ᵀ a (book-keeping trick). For norms alone the
  ghost norm is cheaper when 2T² < d_in·d_out (:func:`use_ghost_norm`); when the clipped sum is wanted too,
  instantiation gets the sum for free and wins unless T²(d_in+d_out) < 8·d_in·d_out
  (:func:`use_ghost_for_clip_sum`). Accumulation is fp32 (fp64 for fp64 inputs); the
  result is fp32 (fp64 for fp64 inputs) and the caller casts.
* Triton (:func:`clip_sum_triton`): two kernels, neither of which writes a per-sample gradient.

  1. ``_sq_norm_kernel``, grid (tiles, B): each program computes one BLOCK_M×BLOCK_N tile of G_b with
     fp32 ``tl.dot`` over BLOCK_K-token slices and atomically adds the tile's sum of squares to
     ``norms_sq[b]``.
  2. Host: f = min(1, C / (√norms_sq + 1e-6)) (a B-vector, same formula as the reference).
  3. ``_clip_sum_kernel``, grid (tiles,): each program recomputes its tile for every sample, keeps
     Σ_b f_b·tile_b in registers (loop over the batch inside the program), adds Philox noise
     ``tl.randn(seed, flat_index) * noise_std`` once per output element and stores the tile once.

  Cost of that choice: the per-sample GEMM is done twice, 4·B·T·d_out·d_in FLOPs instead of 2·B·T·d_out·d_in
  (a non-DP training step of the layer is ≈ 6·B·T·d_out·d_in, so +33% arithmetic for the layer), but HBM
  traffic is only the operand reads of two GEMM passes over a and g plus one d_out·d_in write. The FlashDP review kernel
  (``bmtm_clip_loop.py``) does the GEMM once but, per sample, writes the unclipped G_b, reads and rewrites
  it to clip, and reads it again to add it to the sum: ≈ 4·B·d_out·d_in·4 bytes of extra traffic and
  2·B kernel launches. The paper's on-chip cross-block reduction avoids both but needs a grid-wide
  synchronisation, which plain Triton does not offer. When 2T² < d_in·d_out, pass ``factors`` computed
  from :func:`ghost_norms` (or from a flat norm) and kernel 1 is skipped.
  Loaded fp16/bf16 values are cast to fp32 right after ``tl.load`` (the interpreter's bf16 arithmetic is
  wrong; on GPU the fp32 → tf32 dot is exact for fp16/bf16-origin values since tf32 keeps 10 mantissa
  bits). fp32 inputs use an IEEE fp32 dot unless ``allow_tf32=True``.
  Under ``TRITON_INTERPRET=1`` (CPU tensors, kernels run sequentially in numpy) exactly one autotune config
  (16×16×16 tiles) is used: the autotuner's benchmarker needs a GPU driver.

Noise: the Triton path draws Philox normals keyed on (seed, element index), the PyTorch path draws from a
``torch.Generator``; both are N(0, noise_std²) per element but the values differ. The same seed gives the
same noise, so callers must derive a distinct seed per (step, layer).
"""
from __future__ import annotations

import threading

import torch

from ._triton import HAVE_TRITON, INTERPRET, on_device, tl, triton  # the guarded import, shared by the kernels

__all__ = [
    "EPS",
    "HAVE_TRITON",
    "clip_factors",
    "use_ghost_norm",
    "use_ghost_for_clip_sum",
    "per_sample_norms_reference",
    "ghost_norms",
    "per_sample_norms",
    "clip_sum_reference",
    "bias_clip_sum_reference",
    "bias_clip_sum",
    "clip_sum_triton",
    "clip_sum",
]

EPS = 1e-6
"""Added to the norm before dividing: f_b = min(1, C / (n_b + EPS))."""

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = _TRITON_DTYPES + (torch.float64,)
_BLOCK_ELEMS = 1 << 22  # per-sample gradients held at once by the reference (4M fp32 = 16 MB)


# ---------------------------------------------------------------------------------------------------------
# Input checks shared by both paths
# ---------------------------------------------------------------------------------------------------------
def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, features) or (B, features), got {tuple(x.shape)}")
    return x


def _check(a, g, C, noise_std, factors, dtypes, where):
    a, g = _as_3d(a, "a"), _as_3d(g, "g")
    for name, x in (("a", a), ("g", g)):
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} has dtype {x.dtype}; the {where} path supports {allowed}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must agree in (B, T)")
    if a.device != g.device:
        raise ValueError(f"a is on {a.device} but g is on {g.device}")
    _check_scalars(C, noise_std)
    if factors is not None:
        if not isinstance(factors, torch.Tensor) or factors.shape != (a.shape[0],):
            raise ValueError(f"factors must be a tensor of shape ({a.shape[0]},), got "
                             f"{tuple(factors.shape) if isinstance(factors, torch.Tensor) else factors!r}")
    return a, g


def _check_scalars(C, noise_std):
    if not (float(C) > 0.0) or float(C) == float("inf"):
        raise ValueError(f"clipping threshold C must be a finite number > 0, got {C!r}")
    if not (float(noise_std) >= 0.0) or float(noise_std) == float("inf"):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def clip_factors(norms: torch.Tensor, C: float) -> torch.Tensor:
    """f_b = min(1, C / (n_b + 1e-6)), in the dtype of ``norms``."""
    return (C / (norms + EPS)).clamp(max=1.0)


def use_ghost_norm(T: int, d_in: int, d_out: int) -> bool:
    """Norms only (flat mode): True when the ghost norm (2T²(d_in+d_out) FLOPs/sample) beats instantiation
    (2T·d_in·d_out). The switch used by private-transformers and FastDP."""
    return 2 * T * T < d_in * d_out


GHOST_SUM_FACTOR = 8  # a memory pass over G_b costs about this many GEMM FLOPs per element on a CPU


def use_ghost_for_clip_sum(T: int, d_in: int, d_out: int) -> bool:
    """Norms *and* the clipped sum (per-layer mode): ghost only when its extra work is below instantiation's.

    Instantiation forms G_b anyway, so the clipped sum Σ_b f_b G_b costs memory passes over B·d_in·d_out
    elements and no extra GEMM; the ghost path adds 2BT²(d_in+d_out) FLOPs of Gram matrices on top of the
    (f ⊙ g)ᵀ a GEMM. Ghost wins when T²(d_in+d_out) < GHOST_SUM_FACTOR·d_in·d_out, i.e. for short
    sequences (T ≲ 8 at width 256). Measured on 2 CPU cores (docs/flashdp.md): at B=8, T=128, width 256
    instantiation costs 1.5× the plain weight-gradient GEMM and the ghost path 2.5–7×.
    """
    return T * T * (d_in + d_out) < GHOST_SUM_FACTOR * d_in * d_out


def _block(B: int, d_in: int, d_out: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return block_size
    return max(1, min(B, _BLOCK_ELEMS // max(1, d_in * d_out)))


# ---------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference
# ---------------------------------------------------------------------------------------------------------
def per_sample_norms_reference(a: torch.Tensor, g: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """‖g_bᵀ a_b‖_F for every sample by instantiating G_b, ``block_size`` samples at a time. (B,)"""
    a, g = _as_3d(a, "a"), _as_3d(g, "g")
    acc = _acc_dtype(a, g)
    B, _, d_in = a.shape
    d_out = g.shape[2]
    blk = _block(B, d_in, d_out, block_size)
    norms = torch.empty(B, dtype=acc, device=a.device)
    for s in range(0, B, blk):
        G = torch.bmm(g[s:s + blk].to(acc).transpose(1, 2), a[s:s + blk].to(acc))
        norms[s:s + blk] = torch.linalg.vector_norm(G, dim=(1, 2))
    return norms


def ghost_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖g_bᵀ a_b‖_F = sqrt(Σ_{t,s} (a_t·a_s)(g_t·g_s)) without forming G_b; B·T² memory. (B,)"""
    a, g = _as_3d(a, "a"), _as_3d(g, "g")
    acc = _acc_dtype(a, g)
    a, g = a.to(acc), g.to(acc)
    aa = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
    gg = torch.bmm(g, g.transpose(1, 2))
    # the exact value is >= 0; rounding can make a tiny norm² negative
    return (aa * gg).sum(dim=(1, 2)).clamp(min=0).sqrt()


def per_sample_norms(a: torch.Tensor, g: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Per-sample norms by ``"ghost"``, ``"instantiate"`` or ``"auto"`` (:func:`use_ghost_norm`)."""
    a, g = _as_3d(a, "a"), _as_3d(g, "g")
    if method == "auto":
        method = "ghost" if use_ghost_norm(a.shape[1], a.shape[2], g.shape[2]) else "instantiate"
    if method == "ghost":
        return ghost_norms(a, g)
    if method == "instantiate":
        return per_sample_norms_reference(a, g)
    raise ValueError(f"method must be 'auto', 'ghost' or 'instantiate', got {method!r}")


def _noise_or_zeros(shape, dtype, device, noise_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """The buffer a clipped sum accumulates into: N(0, noise_std²) drawn in place (or zeros). Drawing the noise
    first saves the zero fill, a fresh noise tensor (its page faults cost as much as the draw on a CPU) and the
    pass that adds it."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, noise_std, generator=generator) if noise_std > 0 else out.zero_()


_SCRATCH = threading.local()  # per thread: {(device, dtype): flat buffer of the per-sample gradients of a block}


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of at least ``n`` elements for a block's G_b. On a CPU a fresh tensor of that size
    is page-faulted in on every call (glibc maps large allocations anew), which costs about as much as the
    bmm that fills it and makes step times swing; the buffer is capped by ``_BLOCK_ELEMS`` per (device, dtype)
    and thread. On CUDA the caching allocator already reuses memory, so a fresh tensor is taken there."""
    if device.type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get((device, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _add_noise(x: torch.Tensor, noise_std: float, generator: torch.Generator | None) -> torch.Tensor:
    if noise_std > 0:
        x.add_(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device), alpha=noise_std)
    return x


def clip_sum_reference(
    a: torch.Tensor,
    g: torch.Tensor,
    C: float,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    factors: torch.Tensor | None = None,
    *,
    norm_method: str = "auto",
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_b min(1, C/(‖G_b‖+1e-6)) G_b + N(0, noise_std²), G_b = g_bᵀ a_b. Returns ``(grad, norms)``.

    ``grad`` is (d_out, d_in) fp32 (fp64 for fp64 inputs); ``norms`` is (B,), or ``None`` when ``factors``
    (B,) is given, in which case no norm is computed and grad = Σ_b factors_b G_b (+ noise) in one GEMM.
    ``norm_method``: ``"instantiate"`` forms G_b for ``block_size`` samples at a time and clips and sums
    them in the same pass; ``"ghost"`` takes ghost norms and then one GEMM (f ⊙ g)ᵀ a over all B·T rows;
    ``"auto"`` picks by :func:`use_ghost_for_clip_sum`. ``generator`` seeds the noise (on ``a``'s device).
    """
    a, g = _check(a, g, C, noise_std, factors, _REFERENCE_DTYPES, "reference")
    acc = _acc_dtype(a, g)
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if norm_method == "auto":
        norm_method = "ghost" if use_ghost_for_clip_sum(T, d_in, d_out) else "instantiate"
    if norm_method not in ("ghost", "instantiate"):
        raise ValueError(f"norm_method must be 'auto', 'ghost' or 'instantiate', got {norm_method!r}")

    norms = None
    if factors is None and norm_method == "ghost":
        norms = ghost_norms(a, g)
        factors = clip_factors(norms, C)
    grad = _noise_or_zeros((d_out, d_in), acc, a.device, noise_std, generator)  # the sum accumulates onto it
    if factors is not None:  # book-keeping: one GEMM over the B·T rows
        gf = g.to(acc) * factors.to(device=g.device, dtype=acc)[:, None, None]
        return grad.addmm_(gf.reshape(B * T, d_out).t(), a.to(acc).reshape(B * T, d_in)), norms

    blk = _block(B, d_in, d_out, block_size)
    norms = torch.empty(B, dtype=acc, device=a.device)
    flat = grad.view(-1)
    buf = _scratch(min(blk, B) * d_out * d_in, acc, a.device)
    for s in range(0, B, blk):
        nb = min(blk, B - s)
        G = torch.bmm(g[s:s + nb].to(acc).transpose(1, 2), a[s:s + nb].to(acc),
                      out=buf[:nb * d_out * d_in].view(nb, d_out, d_in))  # (nb, d_out, d_in)
        n = torch.linalg.vector_norm(G, dim=(1, 2))
        norms[s:s + blk] = n
        flat.addmv_(G.reshape(G.shape[0], -1).t(), clip_factors(n, C))  # += Σ_b f_b G_b, no temporary
    return grad, norms


def bias_clip_sum_reference(
    g: torch.Tensor,
    C: float,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bias variant: h_b = Σ_t g_bt (d_out,), n_b = ‖h_b‖, Σ_b f_b h_b + N(0, noise_std²).

    Returns ``(grad (d_out,), norms (B,))``; ``norms`` is ``None`` when ``factors`` is given.
    """
    g = _as_3d(g, "g")
    if g.dtype not in _REFERENCE_DTYPES:
        raise ValueError(f"g has dtype {g.dtype}; supported: float32, float16, bfloat16, float64")
    _check_scalars(C, noise_std)
    if factors is not None and (not isinstance(factors, torch.Tensor) or factors.shape != (g.shape[0],)):
        raise ValueError(f"factors must be a tensor of shape ({g.shape[0]},)")
    acc = _acc_dtype(g)
    h = g.to(acc).sum(dim=1)  # (B, d_out)
    norms = None
    if factors is None:
        norms = torch.linalg.vector_norm(h, dim=1)
        factors = clip_factors(norms, C)
    grad = factors.to(device=h.device, dtype=acc) @ h
    return _add_noise(grad, noise_std, generator), norms


def bias_clip_sum(g: torch.Tensor, C: float, noise_std: float = 0.0, seed: int = 0,
                  factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`bias_clip_sum_reference` with a ``torch.Generator`` seeded by ``seed`` on ``g``'s device
    (bandwidth-bound and tiny, so there is no kernel for it)."""
    gen = torch.Generator(device=g.device).manual_seed(int(seed)) if noise_std > 0 else None
    return bias_clip_sum_reference(g, C, noise_std, gen, factors)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------
if HAVE_TRITON:

    def _configs():
        if INTERPRET:  # the autotuner's benchmarker needs a driver: one config only
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
        shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
            (32, 32, 32, 2, 4),
            (64, 64, 32, 4, 3),
            (64, 64, 64, 4, 4),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
        ]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, n, k, w, s in shapes]

    @triton.jit
    def _g_t_a_tile(a_ptr, g_ptr, pid_m, pid_n, T, D_IN, D_OUT,
                    s_at, s_ai, s_gt, s_go,
                    INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile [pid_m·BM : , pid_n·BN : ] of G_b = g_bᵀ a_b (a_ptr, g_ptr point at sample b), in fp32,
        accumulated over token slices."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output features (rows of G)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input features (columns of G)
        offs_k = tl.arange(0, BLOCK_K)  # tokens
        g_base = g_ptr + offs_m[:, None] * s_go + offs_k[None, :] * s_gt  # (BM, BK) slice of g_bᵀ
        a_base = a_ptr + offs_k[:, None] * s_at + offs_n[None, :] * s_ai  # (BK, BN) slice of a_b
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_K):
            tk = t0 + offs_k
            gt = tl.load(g_base + t0 * s_gt, mask=(offs_m[:, None] < D_OUT) & (tk[None, :] < T), other=0.0)
            at = tl.load(a_base + t0 * s_at, mask=(tk[:, None] < T) & (offs_n[None, :] < D_IN), other=0.0)
            acc += tl.dot(gt.to(tl.float32), at.to(tl.float32), input_precision=INPUT_PRECISION)
        return acc

    # tuned per layer shape only: B (Poisson batches) and T (padded lengths) change every training step, and a
    # new key value re-times every config (~1 s per kernel on a GPU), which would dominate the step
    @triton.autotune(configs=_configs(), key=["D_IN", "D_OUT"], reset_to_zero=["nsq_ptr"])
    @triton.jit
    def _sq_norm_kernel(a_ptr, g_ptr, nsq_ptr, T, D_IN, D_OUT,
                        s_ab, s_at, s_ai, s_gb, s_gt, s_go,
                        INPUT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid (tiles, B): norms_sq[b] += Σ tile(G_b)²."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        n_tiles_n = tl.cdiv(D_IN, BLOCK_N)
        b64 = b.to(tl.int64)  # 64-bit sample offsets: B·T·d can exceed 2³¹
        acc = _g_t_a_tile(a_ptr + b64 * s_ab, g_ptr + b64 * s_gb, pid // n_tiles_n, pid % n_tiles_n,
                          T, D_IN, D_OUT, s_at, s_ai, s_gt, s_go, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.atomic_add(nsq_ptr + b, tl.sum(acc * acc))

    @triton.autotune(configs=_configs(), key=["D_IN", "D_OUT"])
    @triton.jit
    def _clip_sum_kernel(a_ptr, g_ptr, f_ptr, out_ptr, B, T, D_IN, D_OUT,
                         s_ab, s_at, s_ai, s_gb, s_gt, s_go,
                         noise_std, seed,
                         HAS_NOISE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid (tiles,): out_tile = Σ_b f_b tile(G_b) (+ Philox noise), kept in registers over b."""
        pid = tl.program_id(0)
        n_tiles_n = tl.cdiv(D_IN, BLOCK_N)
        pid_m = pid // n_tiles_n
        pid_n = pid % n_tiles_n
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_b = a_ptr  # advanced one sample per iteration (pointer arithmetic is 64-bit)
        g_b = g_ptr
        for b in range(0, B):
            f = tl.load(f_ptr + b)
            tile = _g_t_a_tile(a_b, g_b, pid_m, pid_n, T, D_IN, D_OUT, s_at, s_ai, s_gt, s_go,
                               INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            total += f * tile
            a_b += s_ab
            g_b += s_gb
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        flat = offs_m[:, None] * D_IN + offs_n[None, :]  # row-major index into the (D_OUT, D_IN) output
        if HAS_NOISE:
            total += tl.randn(seed, flat) * noise_std
        tl.store(out_ptr + flat, total, mask=(offs_m[:, None] < D_OUT) & (offs_n[None, :] < D_IN))


def clip_sum_triton(
    a: torch.Tensor,
    g: torch.Tensor,
    C: float,
    noise_std: float = 0.0,
    seed: int = 0,
    factors: torch.Tensor | None = None,
    *,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton path of :func:`clip_sum_reference`: ``(grad (d_out, d_in) fp32, norms (B,) fp32 | None)``.

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before this module was imported.
    ``factors`` (B,) skips the norm kernel (flat clipping, or norms from :func:`ghost_norms`); ``norms``
    is then ``None``. Noise is Philox N(0, noise_std²) keyed on (seed, element index).
    ``allow_tf32`` lets fp32 inputs use a tf32 dot (fp16/bf16 inputs always do; that is exact for them).
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use backend='torch'")
    a, g = _check(a, g, C, noise_std, factors, _TRITON_DTYPES, "triton")
    if not (a.is_cuda or INTERPRET):
        raise RuntimeError("the triton path needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "plait.kernels.dp_clip, for CPU tensors)")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    B, T, d_in = a.shape
    d_out = g.shape[2]
    half = a.dtype != torch.float32 and g.dtype != torch.float32
    precision = "tf32" if (half or allow_tf32) else "ieee"
    strides = (*a.stride(), *g.stride())

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_M"]) * triton.cdiv(d_in, meta["BLOCK_N"]),)

    norms = None
    with on_device(a):
        if factors is None:
            nsq = torch.zeros(B, dtype=torch.float32, device=a.device)
            if B > 0:
                _sq_norm_kernel[lambda meta: (grid(meta)[0], B)](a, g, nsq, T, d_in, d_out, *strides,
                                                                 INPUT_PRECISION=precision)
            norms = nsq.sqrt()
            factors = clip_factors(norms, C)
        factors = factors.to(device=a.device, dtype=torch.float32).contiguous()
        out = torch.empty(d_out, d_in, dtype=torch.float32, device=a.device)
        if out.numel() > 0:
            _clip_sum_kernel[grid](a, g, factors, out, B, T, d_in, d_out, *strides,
                                   float(noise_std), int(seed),
                                   HAS_NOISE=bool(noise_std > 0), INPUT_PRECISION=precision)
    return out, norms


# ---------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------
def clip_sum(
    a: torch.Tensor,
    g: torch.Tensor,
    C: float,
    noise_std: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
    factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped, summed, noised weight gradient ``(grad (d_out, d_in) fp32, norms (B,) | None)``.

    ``backend``: ``"auto"`` (Triton for CUDA tensors when triton is installed, else PyTorch), ``"triton"``
    or ``"torch"``. The PyTorch path seeds a ``torch.Generator`` on ``a``'s device with ``seed``, so the
    two backends draw different (identically distributed) noise for the same seed.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if (HAVE_TRITON and isinstance(a, torch.Tensor) and a.is_cuda) else "torch"
    if backend == "triton":
        return clip_sum_triton(a, g, C, noise_std, seed, factors)
    _check(a, g, C, noise_std, factors, _REFERENCE_DTYPES, "reference")
    gen = None
    if noise_std > 0:
        gen = torch.Generator(device=a.device).manual_seed(int(seed))
    return clip_sum_reference(a, g, C, noise_std, gen, factors)
