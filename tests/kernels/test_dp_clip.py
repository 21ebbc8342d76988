"""Tests for plait.kernels.dp_clip: per-sample clipped, summed, noised linear weight gradients.

The PyTorch reference is checked against an explicit float64 loop over samples (G_b = g_bᵀ a_b built one at
a time). The Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) in a
subprocess, because the variable must be set before triton / the kernel module is imported; the subprocess
prints one JSON line of error metrics that the tests below assert on.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from plait.kernels import dp_clip
from plait.kernels.dp_clip import (
    EPS,
    bias_clip_sum,
    bias_clip_sum_reference,
    clip_factors,
    clip_sum,
    clip_sum_reference,
    clip_sum_triton,
    ghost_norms,
    per_sample_norms,
    per_sample_norms_reference,
    use_ghost_for_clip_sum,
    use_ghost_norm,
)

# (B, T, d_in, d_out): T = 1, short and longer sequences, odd sizes
SHAPES = [(5, 1, 7, 3), (6, 4, 5, 9), (4, 16, 8, 6), (9, 3, 33, 17), (3, 40, 12, 10)]


def make(B, T, d_in, d_out, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d_in, generator=gen, dtype=dtype)
    # different scales per sample so the norms spread over orders of magnitude
    g = torch.randn(B, T, d_out, generator=gen, dtype=dtype) * torch.logspace(-1, 1, B, dtype=dtype)[:, None, None]
    return a, g


def loop_grads(a, g):
    """Per-sample gradients built one at a time in float64: list of (d_out, d_in)."""
    return [g[b].double().t() @ a[b].double() for b in range(a.shape[0])]


def loop_clip_sum(a, g, C):
    Gs = loop_grads(a, g)
    norms = torch.stack([torch.linalg.norm(G) for G in Gs])
    total = sum(min(1.0, C / (float(n) + EPS)) * G for G, n in zip(Gs, norms))
    return total, norms


def close(x, y, rtol):
    return torch.allclose(x.double(), y.double(), rtol=rtol, atol=rtol * float(y.abs().max()))


# ----------------------------------------------------------------------------------------------------------
# Reference vs explicit loop (float64)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_norms_match_loop(shape):
    a, g = make(*shape)
    _, expected = loop_clip_sum(a, g, 1.0)
    for block in (1, 2, None):
        assert close(per_sample_norms_reference(a, g, block_size=block), expected, 1e-12)
    assert close(ghost_norms(a, g), expected, 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("regime", ["most_clip", "none_clip"])
@pytest.mark.parametrize("norm_method", ["instantiate", "ghost", "auto"])
def test_reference_clip_sum_matches_loop(shape, regime, norm_method):
    a, g = make(*shape)
    norms = per_sample_norms_reference(a, g)
    # small C: every sample but possibly the smallest is clipped; large C: none is
    C = float(norms.min()) * 1.5 if regime == "most_clip" else float(norms.max()) * 2
    expected, expected_norms = loop_clip_sum(a, g, C)
    n_clipped = int((expected_norms + EPS > C).sum())
    if regime == "most_clip":
        assert n_clipped >= shape[0] - 1
    else:
        assert n_clipped == 0
    grad, got_norms = clip_sum_reference(a, g, C, norm_method=norm_method, block_size=2)
    assert grad.dtype == torch.float64 and grad.shape == (shape[3], shape[2])
    assert close(got_norms, expected_norms, 1e-12)
    assert close(grad, expected, 1e-12)


def test_reference_accepts_2d_inputs_as_single_token():
    a, g = make(6, 1, 5, 4)
    C = 0.5
    expected, _ = loop_clip_sum(a, g, C)
    grad, norms = clip_sum_reference(a[:, 0], g[:, 0], C)
    assert norms.shape == (6,)
    assert close(grad, expected, 1e-12)


def test_reference_with_factors_is_weighted_sum():
    a, g = make(7, 5, 6, 4)
    f = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = sum(fb * G for fb, G in zip(f, loop_grads(a, g)))
    grad, norms = clip_sum_reference(a, g, 1.0, factors=f)
    assert norms is None
    assert close(grad, expected, 1e-12)


def test_reference_low_precision_inputs_accumulate_in_fp32():
    a, g = make(4, 8, 6, 5, dtype=torch.float32)
    C = 1.0
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        grad, norms = clip_sum_reference(a.to(dt), g.to(dt), C)
        assert grad.dtype == torch.float32 and norms.dtype == torch.float32
        expected, expected_norms = loop_clip_sum(a.to(dt), g.to(dt), C)  # same rounded inputs, float64 math
        assert close(norms, expected_norms, 1e-5)
        assert close(grad, expected, 1e-5)


def test_sensitivity_bound_with_huge_canary():
    """σ = 0: adding one sample with an enormous gradient moves the sum by at most C."""
    a, g = make(6, 4, 8, 5)
    C = 0.3
    base, _ = clip_sum_reference(a, g, C)
    ca = torch.randn(1, 4, 8, dtype=torch.float64) * 1e3
    cg = torch.randn(1, 4, 5, dtype=torch.float64) * 1e3
    with_canary, _ = clip_sum_reference(torch.cat([a, ca]), torch.cat([g, cg]), C)
    assert torch.linalg.norm(with_canary - base) <= C + 1e-9


# ----------------------------------------------------------------------------------------------------------
# Ghost norms
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,d_in,d_out,ghost",
    [(128, 256, 256, False), (128, 256, 2048, False), (4, 256, 256, True), (32, 256, 256, False),
     (31, 256, 256, True), (1, 1, 1, True), (3, 1, 1, False)],
)
def test_clip_sum_switch_counts_ghost_work_against_free_sum(T, d_in, d_out, ghost):
    # closed form: ghost iff T²(d_in + d_out) < 8·d_in·d_out
    assert use_ghost_for_clip_sum(T, d_in, d_out) is ghost


@pytest.mark.parametrize(
    "T,d_in,d_out,ghost_cheaper",
    [(2, 8, 8, True), (4, 16, 12, True), (16, 4, 4, False), (12, 6, 3, False), (1, 5, 7, True), (1, 1, 1, False)],
)
def test_ghost_norms_match_instantiated(T, d_in, d_out, ghost_cheaper):
    assert use_ghost_norm(T, d_in, d_out) is ghost_cheaper
    a, g = make(5, T, d_in, d_out)
    inst = per_sample_norms_reference(a, g)
    assert close(ghost_norms(a, g), inst, 1e-12)
    assert close(per_sample_norms(a, g, "auto"), inst, 1e-12)
    if T == 1:  # only then does the norm factorise into ‖a‖‖g‖
        assert close(inst, a[:, 0].norm(dim=1) * g[:, 0].norm(dim=1), 1e-12)
    # fp32 ghost norm stays close too (it can cancel, hence the looser bound)
    assert close(ghost_norms(a.float(), g.float()), inst, 1e-4)


# ----------------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------------
def _noise_stats(diff, std):
    """Standardised checks on n i.i.d. N(0, std²) draws: mean within 5 SE (std/√n), sample std within
    5 SE (≈ std/√(2n)), fraction inside ±1 std within 5 SE of 0.6827."""
    z = diff.double().flatten() / std
    n = z.numel()
    inside = float((z.abs() < 1).double().mean())
    return {
        "mean_ok": abs(float(z.mean())) < 5 / math.sqrt(n),
        "std_ok": abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n),
        "shape_ok": abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n),
    }


def test_reference_noise_statistics():
    a, g = make(4, 6, 128, 64, dtype=torch.float32)  # 8192 output elements
    C, std = 0.7, 0.3
    clean, _ = clip_sum_reference(a, g, C)
    noisy, _ = clip_sum_reference(a, g, C, std, generator=torch.Generator().manual_seed(1234))
    assert _noise_stats(noisy - clean, std) == {"mean_ok": True, "std_ok": True, "shape_ok": True}
    again, _ = clip_sum_reference(a, g, C, std, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(noisy, again)


@pytest.mark.parametrize("path", ["instantiate", "ghost", "factors"])
def test_noise_drawn_into_the_sum_buffer_on_every_path(path):
    """The clipped sum accumulates onto noise drawn in place: each path's noisy result minus its σ = 0 result is
    N(0, std²) (within rounding of the sum), and equals the generator's own draw scaled by std."""
    a, g = make(4, 6, 128, 64, dtype=torch.float32)
    C, std = 0.7, 0.3
    kw = {"factors": torch.rand(4, generator=torch.Generator().manual_seed(5))} if path == "factors" else \
        {"norm_method": path}
    clean, _ = clip_sum_reference(a, g, C, **kw)
    noisy, _ = clip_sum_reference(a, g, C, std, generator=torch.Generator().manual_seed(99), **kw)
    assert _noise_stats(noisy - clean, std) == {"mean_ok": True, "std_ok": True, "shape_ok": True}
    z = torch.randn(clean.shape, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(noisy - clean, z * std, rtol=0, atol=1e-5 * float(clean.abs().max()) + 1e-6)


def test_dispatcher_cpu_uses_reference_seeded_generator():
    a, g = make(3, 5, 6, 4, dtype=torch.float32)
    grad, norms = clip_sum(a, g, 0.5, noise_std=0.2, seed=7)
    ref, ref_norms = clip_sum_reference(a, g, 0.5, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(grad, ref) and torch.equal(norms, ref_norms)
    same, _ = clip_sum(a, g, 0.5, noise_std=0.2, seed=7, backend="torch")
    other, _ = clip_sum(a, g, 0.5, noise_std=0.2, seed=8)
    assert torch.equal(grad, same) and not torch.equal(grad, other)


# ----------------------------------------------------------------------------------------------------------
# Bias
# ----------------------------------------------------------------------------------------------------------
def test_bias_clip_sum_matches_loop():
    _, g = make(7, 5, 1, 6)
    h = [g[b].sum(0) for b in range(7)]
    norms = torch.stack([x.norm() for x in h])
    C = float(norms.median())
    expected = sum(min(1.0, C / (float(n) + EPS)) * x for x, n in zip(h, norms))
    grad, got = bias_clip_sum_reference(g, C)
    assert close(got, norms, 1e-12) and close(grad, expected, 1e-12)
    f = torch.linspace(0.1, 1, 7, dtype=torch.float64)
    grad_f, none = bias_clip_sum_reference(g, C, factors=f)
    assert none is None and close(grad_f, sum(fb * x for fb, x in zip(f, h)), 1e-12)
    _, g32 = make(3, 4, 1, 4096, dtype=torch.float32)
    clean, _ = bias_clip_sum(g32, 1.0)
    noisy, _ = bias_clip_sum(g32, 1.0, noise_std=0.5, seed=3)
    assert _noise_stats(noisy - clean, 0.5) == {"mean_ok": True, "std_ok": True, "shape_ok": True}


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------
def test_invalid_inputs_raise_value_error():
    a, g = make(3, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        clip_sum(a.to(torch.int32), g, 1.0)
    with pytest.raises(ValueError, match="triton"):  # fp64 only on the reference path
        clip_sum(a.double(), g.double(), 1.0, backend="triton")
    for C in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="C must be"):
            clip_sum(a, g, C)
    with pytest.raises(ValueError, match="noise_std"):
        clip_sum(a, g, 1.0, noise_std=-0.1)
    with pytest.raises(ValueError, match="agree"):
        clip_sum(a, g[:2], 1.0)
    with pytest.raises(ValueError, match="agree"):
        clip_sum(a, g[:, :3], 1.0)
    with pytest.raises(ValueError, match="shape"):
        clip_sum(a[0, 0], g, 1.0)
    with pytest.raises(ValueError, match="factors"):
        clip_sum(a, g, 1.0, factors=torch.ones(4))
    with pytest.raises(ValueError, match="backend"):
        clip_sum(a, g, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="norm_method"):
        clip_sum_reference(a, g, 1.0, norm_method="fast")
    with pytest.raises(ValueError, match="C must be"):
        bias_clip_sum_reference(g, 0.0)


@pytest.mark.skipif(not dp_clip.HAVE_TRITON or dp_clip.INTERPRET, reason="needs triton, interpreter off")
def test_triton_path_refuses_cpu_tensors_without_interpreter():
    a, g = make(2, 4, 16, 16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        clip_sum_triton(a, g, 1.0)


def test_clip_factor_formula():
    n = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    assert torch.allclose(clip_factors(n, 1.0), torch.tensor([1.0, 1.0, 1 / (1 + EPS), 1 / (4 + EPS)], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import json, math, torch
    from plait.kernels import dp_clip as m
    assert m.INTERPRET, "TRITON_INTERPRET=1 was not seen at import"

    def rel(x, y):
        return float((x.double() - y.double()).abs().max() / y.double().abs().max())

    out = {}
    gen = torch.Generator().manual_seed(0)
    # (name, B, T, d_in, d_out); 16x16x16 tiles; the second one has partial tiles everywhere
    for name, B, T, d_in, d_out in [("even", 3, 16, 32, 32), ("ragged", 3, 20, 40, 24), ("seq32", 2, 32, 32, 48)]:
        a = torch.randn(B, T, d_in, generator=gen)
        g = torch.randn(B, T, d_out, generator=gen) * torch.tensor([0.1, 1.0, 10.0][:B])[:, None, None]
        norms = m.per_sample_norms_reference(a, g)
        C = float(norms.median())  # some samples clipped, some not
        ref, ref_n = m.clip_sum_reference(a, g, C)
        got, got_n = m.clip_sum_triton(a, g, C)
        out[f"fp32_{name}"] = {"norm": rel(got_n, ref_n), "grad": rel(got, ref),
                               "dtype": str(got.dtype), "shape": list(got.shape),
                               "clipped": int((ref_n > C).sum())}
        if name == "even":
            for dt in (torch.float16, torch.bfloat16):
                lo_ref, lo_ref_n = m.clip_sum_reference(a.to(dt), g.to(dt), C)  # same rounded inputs
                lo, lo_n = m.clip_sum_triton(a.to(dt), g.to(dt), C)
                key = str(dt).replace("torch.", "")
                out[key] = {"norm_same_inputs": rel(lo_n, lo_ref_n), "grad_same_inputs": rel(lo, lo_ref),
                            "norm_vs_fp32": rel(lo_n, ref_n), "grad_vs_fp32": rel(lo, ref)}
            f = torch.rand(B, generator=gen)
            got_f, none = m.clip_sum_triton(a, g, C, factors=f)
            out["factors"] = {"grad": rel(got_f, m.clip_sum_reference(a, g, C, factors=f)[0]),
                              "norms_is_none": none is None}
            # non-contiguous inputs (transposed views)
            at = a.transpose(1, 2).contiguous().transpose(1, 2)
            gt = g.transpose(1, 2).contiguous().transpose(1, 2)
            out["strided"] = {"grad": rel(m.clip_sum_triton(at, gt, C)[0], ref), "contig": at.is_contiguous()}
            std = 0.25
            noisy, _ = m.clip_sum_triton(a, g, C, std, seed=11)
            z = ((noisy - m.clip_sum_triton(a, g, C)[0]) / std).double().flatten()
            out["noise_small"] = {"n": z.numel(), "mean": float(z.mean()), "std": float(z.std())}
            out["dispatch_forced"] = {"grad": rel(m.clip_sum(a, g, C, backend="triton")[0], ref)}

    # noise on a 64x64 output (4096 elements): zero gradients, so the output is the noise itself
    std = 0.5
    a = torch.randn(1, 16, 64, generator=gen)
    g = torch.zeros(1, 16, 64)
    n1, _ = m.clip_sum_triton(a, g, 1.0, std, seed=123)
    n1b, _ = m.clip_sum_triton(a, g, 1.0, std, seed=123)
    n2, _ = m.clip_sum_triton(a, g, 1.0, std, seed=124)
    z = (n1 / std).double().flatten()
    out["noise"] = {"n": z.numel(), "mean": float(z.mean()), "std": float(z.std()),
                    "inside1": float((z.abs() < 1).double().mean()),
                    "same_seed_equal": bool(torch.equal(n1, n1b)),
                    "other_seed_corr": float(torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1])}
    try:
        m.clip_sum_triton(a.double(), g.double(), 1.0)
        out["fp64_error"] = None
    except ValueError as e:
        out["fp64_error"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interp(run_under_interpreter):
    return run_under_interpreter(INTERPRETER_SCRIPT, timeout=900, kernel=dp_clip)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32_even", "fp32_ragged", "fp32_seq32"])
def test_triton_interpreter_fp32_matches_reference(interp, name):
    r = interp[name]
    assert r["dtype"] == "torch.float32"
    assert r["clipped"] >= 1
    assert r["norm"] < 1e-5 and r["grad"] < 1e-5, r


@pytest.mark.slow
def test_triton_interpreter_half_inputs(interp):
    for key in ("float16", "bfloat16"):
        r = interp[key]
        # same rounded inputs as the reference: only fp32 summation order differs
        assert r["norm_same_inputs"] < 1e-5 and r["grad_same_inputs"] < 1e-5, (key, r)
    # against the fp32 originals: input rounding (fp16 ≈ 5e-4, bf16 ≈ 4e-3 per element)
    assert interp["float16"]["norm_vs_fp32"] < 1e-2 and interp["float16"]["grad_vs_fp32"] < 1e-2
    assert interp["bfloat16"]["norm_vs_fp32"] < 3e-2 and interp["bfloat16"]["grad_vs_fp32"] < 3e-2


@pytest.mark.slow
def test_triton_interpreter_factors_strides_dispatch(interp):
    assert interp["factors"]["norms_is_none"] and interp["factors"]["grad"] < 1e-5
    assert not interp["strided"]["contig"] and interp["strided"]["grad"] < 1e-5
    assert interp["dispatch_forced"]["grad"] < 1e-5
    assert "triton" in interp["fp64_error"]


@pytest.mark.slow
def test_triton_interpreter_noise_statistics(interp):
    """Philox noise: 4096 draws, mean within 5/√n, std within 5/√(2n), P(|z|<1) within 5 SE of 0.6827;
    same seed reproduces, another seed is uncorrelated (|ρ| < 5/√n)."""
    r = interp["noise"]
    n = r["n"]
    assert n == 4096
    assert abs(r["mean"]) < 5 / math.sqrt(n)
    assert abs(r["std"] - 1) < 5 / math.sqrt(2 * n)
    assert abs(r["inside1"] - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    assert r["same_seed_equal"]
    assert abs(r["other_seed_corr"]) < 5 / math.sqrt(n)
    small = interp["noise_small"]  # noisy − noiseless on real gradients, 1024 elements
    assert abs(small["mean"]) < 5 / math.sqrt(small["n"])
    assert abs(small["std"] - 1) < 5 / math.sqrt(2 * small["n"])


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target (no GPU needed): catches what the interpreter does not check
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.skipif(not dp_clip.HAVE_TRITON or dp_clip.INTERPRET, reason="needs triton, interpreter off")
@pytest.mark.parametrize("ptr,precision", [("*fp32", "ieee"), ("*bf16", "tf32"), ("*fp16", "tf32")])
def test_kernels_compile_for_sm90(triton_aot, ptr, precision):
    triton, GPUTarget, ASTSource = triton_aot
    target = GPUTarget("cuda", 90, 32)
    ints = {k: "i32" for k in ("T", "D_IN", "D_OUT", "s_ab", "s_at", "s_ai", "s_gb", "s_gt", "s_go")}
    tiles = ("INPUT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K")
    norm_sig = {"a_ptr": ptr, "g_ptr": ptr, "nsq_ptr": "*fp32", **ints, **{k: "constexpr" for k in tiles}}
    sum_sig = {"a_ptr": ptr, "g_ptr": ptr, "f_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", **ints,
               "noise_std": "fp32", "seed": "i64", "HAS_NOISE": "constexpr", **{k: "constexpr" for k in tiles}}
    for (bm, bn, bk, warps, stages) in [(64, 64, 32, 4, 3)]:
        consts = {"INPUT_PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        opts = {"num_warps": warps, "num_stages": stages}
        k1 = triton.compile(ASTSource(dp_clip._sq_norm_kernel.fn, norm_sig, constexprs=consts),
                            target=target, options=opts)
        k2 = triton.compile(ASTSource(dp_clip._clip_sum_kernel.fn, sum_sig, constexprs={**consts, "HAS_NOISE": True}),
                            target=target, options=opts)
        assert "atom" in k1.asm["ptx"] and "cubin" in k2.asm
        if precision == "tf32":  # tensor-core dot for fp16/bf16 inputs (cast to fp32, exact in tf32)
            assert "mma" in k2.asm["ptx"]
