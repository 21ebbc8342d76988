"""plait.kernels.wip_minprod: the min-product similarity kernel against its definition.

The reference is checked against the sign·min definition written with an explicit loop; the Triton kernel runs
under the interpreter (TRITON_INTERPRET=1, CPU tensors) in a subprocess, because the variable must be set before
triton is imported; it is also compiled ahead of time for sm_90 to check that its PTX has no floating-point
multiplication.
"""
from __future__ import annotations

import re
import textwrap

import pytest
import torch

from plait.kernels import wip_minprod
from plait.kernels.wip_minprod import minprod_reference


def test_reference_equals_the_definition_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    ql, kl = q.tolist(), k.tolist()
    want = torch.tensor([[[sum((1.0 if x * y > 0 else -1.0) * min(abs(x), abs(y)) for x, y in zip(qi, kj))
                           for kj in kl[b]] for qi in ql[b]] for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(minprod_reference(q, k, chunk=2), want, rtol=1e-12, atol=1e-12)


INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import json, torch
    from plait.kernels import wip_minprod as m
    from plait.plugins.wip.operators import get_operator
    assert m.INTERPRET, "TRITON_INTERPRET=1 was not seen at import"

    def rel(x, y):
        return float((x.double() - y.double()).abs().max() / y.double().abs().max())

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, lead, tq, tk, d in [("even", (2, 2), 16, 16, 16), ("ragged", (3,), 20, 13, 24), ("gqa", (1, 4), 7, 33, 8)]:
        q, k = torch.randn(*lead, tq, d, generator=gen), torch.randn(*lead, tk, d, generator=gen)
        got = m.minprod_triton(q, k)
        out[name] = {"err": rel(got, m.minprod_reference(q, k)), "shape": list(got.shape),
                     "dtype": str(got.dtype)}
    q, k = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 16, 16, generator=gen)
    for dt in (torch.float16, torch.bfloat16):
        out[str(dt)] = rel(m.minprod_triton(q.to(dt), k.to(dt)), m.minprod_reference(q.to(dt), k.to(dt)))
    with torch.no_grad():  # the WiP operator dispatches to the kernel when no gradient is needed
        out["dispatch"] = {"used": m.use_triton(q, k), "err": rel(get_operator("minprod").sim(q, k),
                                                                  m.minprod_reference(q, k))}
    out["grad_path_kept"] = not m.use_triton(q.requires_grad_(), k)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interp(run_under_interpreter):
    return run_under_interpreter(INTERPRETER_SCRIPT, timeout=600, kernel=wip_minprod)


@pytest.mark.slow
def test_triton_kernel_matches_the_reference_under_the_interpreter(interp):
    for name, shape in (("even", [2, 2, 16, 16]), ("ragged", [3, 20, 13]), ("gqa", [1, 4, 7, 33])):
        assert interp[name]["shape"] == shape
        assert interp[name]["dtype"] == "torch.float32"
        assert interp[name]["err"] < 1e-6, (name, interp[name])
    assert interp["torch.float16"] < 1e-6 and interp["torch.bfloat16"] < 1e-6


@pytest.mark.slow
def test_operator_dispatches_to_the_kernel_only_without_gradients(interp):
    assert interp["dispatch"]["used"] and interp["dispatch"]["err"] < 1e-6
    assert interp["grad_path_kept"]


@pytest.mark.skipif(not wip_minprod.HAVE_TRITON or wip_minprod.INTERPRET, reason="needs triton, interpreter off")
@pytest.mark.parametrize("ptr", ["*fp32", "*bf16"])
def test_kernel_compiles_for_sm90_without_float_multiplications(triton_aot, ptr):
    triton, GPUTarget, ASTSource = triton_aot
    ints = {k: "i32" for k in ("TQ", "TK", "D", "sqb", "sqm", "sqd", "skb", "skn", "skd", "ssb", "ssm", "ssn")}
    sig = {"q_ptr": ptr, "k_ptr": ptr, "s_ptr": "*fp32", **ints,
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    kernel = triton.compile(ASTSource(wip_minprod._minprod_kernel, sig,
                                      constexprs={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16}),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "min.f32" in ptx or "min.NaN.f32" in ptx or "min.ftz.f32" in ptx
    assert not re.search(r"\b(mul|fma)(\.r[nzmp])?(\.ftz)?\.f(16|32|64)\b", ptx)
