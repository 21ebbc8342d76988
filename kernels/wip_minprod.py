"""Min-product attention similarity S[b, i, j] = Σ_d sign(q_bid·k_bjd)·min(|q_bid|, |k_bjd|) in one pass.

Shapes: ``q`` (..., Tq, D), ``k`` (..., Tk, D) with the same leading dims; result (..., Tq, Tk) in fp32.

Paths
-----
* Reference (:func:`minprod_reference`): the PyTorch path of ``plait.plugins.wip.operators`` uses the
  identity ½(‖q+k‖₁ − ‖q−k‖₁) with two ``torch.cdist(p=1)`` calls: two passes over the pairs and two
  (…, Tq, Tk) outputs. This reference is the direct form, chunked, for checking.
* Triton (:func:`minprod_triton`): grid (Tq tiles, Tk tiles, batch); each program loads a BLOCK_M×BLOCK_D
  tile of q and a BLOCK_N×BLOCK_D tile of k per step over D, forms the BLOCK_M×BLOCK_N×BLOCK_D block of
  sign-selected minima with no multiplication (the sign is the XOR of the sign bits, the magnitude a
  ``minimum``) and accumulates in fp32 registers; S is written once. Loaded fp16/bf16 values are cast to
  fp32 right after ``tl.load`` (the interpreter's bf16 arithmetic is wrong). Forward only: the WiP
  operator dispatches here for CUDA tensors that need no gradient (inference), and keeps the differentiable
  cdist path otherwise. Under ``TRITON_INTERPRET=1`` (CPU tensors) one block config (16×16×16) is used;
  ``tests/kernels/test_wip_minprod.py`` checks parity there. Speed on a GPU is not measured in this repo.
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, INTERPRET, on_device, tl, triton  # the guarded import, shared by the kernels

__all__ = ["HAVE_TRITON", "minprod_reference", "minprod_triton", "use_triton"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def minprod_reference(q: torch.Tensor, k: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Σ_d sign(q·k)·min(|q|, |k|) by explicit broadcasting over query chunks (fp32, or fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    parts = []
    for i in range(0, q.shape[-2], chunk):
        a, b = q[..., i:i + chunk, None, :], k[..., None, :, :]
        neg = (a < 0) ^ (b < 0)
        m = torch.minimum(a.abs(), b.abs())
        parts.append(torch.where(neg, -m, m).sum(-1))
    return torch.cat(parts, dim=-2)


def use_triton(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`minprod_triton` serves these inputs (CUDA, or CPU under the interpreter; no grad)."""
    if not HAVE_TRITON or q.dtype not in _DTYPES or k.dtype not in _DTYPES:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    return (q.is_cuda and k.is_cuda) or (INTERPRET and q.device.type == "cpu")


if HAVE_TRITON:

    @triton.jit
    def _minprod_kernel(q_ptr, k_ptr, s_ptr, TQ, TK, D,
                        sqb, sqm, sqd, skb, skn, skd, ssb, ssm, ssn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_b = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + rd
            q = tl.load(q_ptr + pid_b * sqb + rm[:, None] * sqm + dd[None, :] * sqd,
                        mask=(rm[:, None] < TQ) & (dd[None, :] < D), other=0.0).to(tl.float32)
            k = tl.load(k_ptr + pid_b * skb + rn[:, None] * skn + dd[None, :] * skd,
                        mask=(rn[:, None] < TK) & (dd[None, :] < D), other=0.0).to(tl.float32)
            a = q[:, None, :]
            b = k[None, :, :]
            m = tl.minimum(tl.abs(a), tl.abs(b))
            neg = (a < 0) ^ (b < 0)
            acc += tl.sum(tl.where(neg, -m, m), axis=2)
        tl.store(s_ptr + pid_b * ssb + rm[:, None] * ssm + rn[None, :] * ssn, acc,
                 mask=(rm[:, None] < TQ) & (rn[None, :] < TK))


def minprod_triton(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The Triton kernel; same result as :func:`minprod_reference` (fp32 output)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use minprod_reference")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in leading dims and head dim")
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype}/{k.dtype} not supported; allowed: float32, float16, bfloat16")
    lead, tq, tk, d = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
    q3, k3 = q.reshape(-1, tq, d), k.reshape(-1, tk, d)
    out = torch.empty(q3.shape[0], tq, tk, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out.reshape(*lead, tq, tk)
    bm = bn = 16 if INTERPRET else 32
    bd = 16
    grid = (triton.cdiv(tq, bm), triton.cdiv(tk, bn), q3.shape[0])
    with on_device(q):
        _minprod_kernel[grid](q3, k3, out, tq, tk, d, *q3.stride(), *k3.stride(), *out.stride(),
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    return out.reshape(*lead, tq, tk)
