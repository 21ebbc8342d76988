"""The two small-model methods on one GPU: capsule inference frames/s and the WiP min-product kernel.

* ``capsule`` (runs first: it is quick): V2-SfMLearner depth + pose + vibration inference (the same call as
  ``benchmarks/capsule/capsule.py``'s CPU figure), frames/s at 64×80 (the configs' width-16 nets) and 256×320 (width 16
  and ResNet-18 widths), batch 1 and 8, fp32 and bf16 autocast. CUDA-synchronised wall clock over 30 calls after
  a warm-up.
* ``wip``: the attention similarity of one layer (B·H = 32 heads, head dim 128, T = 1024 / 2048 / 4096):
  exact ``q @ kᵀ`` (fp16), the PyTorch min-product path (two ``cdist``, fp32), and the Triton min-product
  kernel (fp16 in, fp32 accumulate). Parity of the kernel against the direct fp64 definition at T = 512 on the
  same rounded inputs (max abs error relative to max |S|; the input rounding is reported beside it). The claim of WiP is arithmetic (no multiplications), not GPU speed: the
  time ratios say what the emulation costs on tensor-core hardware, where a matmul is the fastest op there is.
  Each timing runs up to 20 calls but stops adding calls after about ``--max-op-s`` (the cdist path takes ~0.35 s
  a call at T = 2048 on an H200, ~4x that at 4096); the calls used are in ``repeats``. Sizes go up in order and
  none starts after ``--budget-s``.

    python benchmarks/gpu/capsule_wip_gpu.py --out $OUT/capsule_wip_gpu.json
    python benchmarks/gpu/capsule_wip_gpu.py --device cpu --tiny --out /tmp/capsule_wip_gpu.json  # logic check

Works without plait installed (imports the modules from this checkout). The JSON (``--out``) is rewritten after
every result; nothing new starts after ``--budget-s``. A summary JSON is printed on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from _results import T_START, Results, import_from_checkout  # benchmarks/gpu/_results.py


def log(*a) -> None:
    print(f"[capsule_wip_gpu {time.perf_counter() - T_START:6.1f}s]", *a, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, max_s: float | None = None) -> tuple[float, int]:
    """``(mean seconds per call, calls timed)`` after one warm-up (synchronised on CUDA): ``repeats`` calls, or
    fewer when ``max_s`` is given and one call (timed alone first) says they would take longer than that."""
    fn()
    _sync(device)
    n = repeats
    if max_s is not None:
        start = time.perf_counter()
        fn()
        _sync(device)
        one = time.perf_counter() - start
        n = max(1, min(repeats, int(max_s / max(one, 1e-9))))
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / n, n


def capsule_fps(device, height, width, width_c, blocks, batch, bf16, repeats) -> float:
    depthnet = import_from_checkout("plait.plugins.capsule.depthnet", log)
    model = depthnet.build_v2_sfmlearner(height=height, width=width, depth_width=width_c, depth_blocks=blocks,
                                         pose_width=width_c, pose_blocks=blocks, imu_window=10,
                                         vibration=True).to(device).eval()
    a, b = torch.rand(batch, 3, height, width, device=device), torch.rand(batch, 3, height, width, device=device)
    imu = torch.randn(batch, 6, 10, device=device)

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.depth(a), model.pose(a, b, imu)

    return batch / timed(step, device, repeats)[0]


def wip_similarity(device, t, heads, d, repeats, with_triton, max_s) -> dict:
    kern = import_from_checkout("plait.kernels.wip_minprod", log)
    g = torch.Generator(device="cpu").manual_seed(0)
    q32 = torch.randn(heads, t, d, generator=g).to(device)
    k32 = torch.randn(heads, t, d, generator=g).to(device)
    half = torch.float16 if device.type == "cuda" else torch.float32
    q16, k16 = q32.to(half), k32.to(half)
    row, used = {}, {}
    row["exact_matmul_s"], used["exact_matmul"] = timed(lambda: torch.matmul(q16, k16.transpose(-1, -2)), device,
                                                        repeats, max_s)
    # the operator's differentiable PyTorch path (plugins/wip/operators.py), spelled out: on CUDA without grad the
    # operator itself would dispatch to the Triton kernel
    row["minprod_torch_cdist_s"], used["minprod_torch_cdist"] = timed(
        lambda: 0.5 * (torch.cdist(q32, -k32, p=1) - torch.cdist(q32, k32, p=1)), device, repeats, max_s)
    if with_triton and kern.use_triton(q16, k16):
        row["minprod_triton_s"], used["minprod_triton"] = timed(lambda: kern.minprod_triton(q16, k16), device,
                                                                repeats, max_s)
        row["triton_vs_exact"] = row["minprod_triton_s"] / row["exact_matmul_s"]
        row["triton_vs_torch_minprod"] = row["minprod_triton_s"] / row["minprod_torch_cdist_s"]
    row["torch_minprod_vs_exact"] = row["minprod_torch_cdist_s"] / row["exact_matmul_s"]
    row["repeats"] = used
    return row


def wip_parity(device, t, heads, d) -> dict:
    kern = import_from_checkout("plait.kernels.wip_minprod", log)
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k = torch.randn(heads, t, d, generator=g), torch.randn(heads, t, d, generator=g)
    ref = kern.minprod_reference(q.double(), k.double())
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        qd, kd = q.to(device, dtype), k.to(device, dtype)
        if not kern.use_triton(qd, kd):
            out[name] = "triton not usable here"
            continue
        # the reference on the same rounded inputs: the kernel's only error is its fp32 accumulation
        ref_d = kern.minprod_reference(qd.double().cpu(), kd.double().cpu())
        got = kern.minprod_triton(qd, kd).double().cpu()
        out[name] = {"max_abs_err_rel": float((got - ref_d).abs().max() / ref_d.abs().max()),
                     "input_rounding_rel": float((ref_d - ref).abs().max() / ref.abs().max())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes and few repeats (CPU logic check)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="start nothing new after this many seconds")
    ap.add_argument("--parts", default="capsule,wip", help="which parts; they always run capsule first, then wip")
    ap.add_argument("--max-op-s", type=float, default=2.0,
                    help="stop adding timed calls of one WiP op after about this many seconds")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu --tiny")
    res = Results(args.out, {"benchmark": "capsule_wip_gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                             "config": vars(args), "wip": {}, "capsule": {}})
    res.save()

    def over_budget() -> bool:
        if time.perf_counter() - T_START > args.budget_s:
            log("budget reached: starting nothing new")
            return True
        return False

    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - {"capsule", "wip"})
    if bad:
        raise SystemExit(f"--parts: unknown {bad}; allowed: capsule, wip")
    if "capsule" in parts:  # first: a dozen small inference timings, seconds in all
        sizes = [(64, 80, 16, [1, 1, 1]), (256, 320, 16, [1, 1, 1]), (256, 320, 64, [2, 2, 2, 2])]
        configs = [(h, w, c, blocks, batch, bf16) for h, w, c, blocks in (sizes[:1] if args.tiny else sizes)
                   for batch in ((1,) if args.tiny else (1, 8)) for bf16 in ((False,) if args.tiny else (False, True))]
        for h, w, c, blocks, batch, bf16 in configs:
            key = f"{h}x{w}_w{c}_{'-'.join(map(str, blocks))}_b{batch}_{'bf16' if bf16 else 'fp32'}"
            if over_budget():
                res.doc["capsule"][key] = {"skipped": "time budget spent"}
                continue
            log(f"capsule {key}")
            res.doc["capsule"][key] = {"frames_per_s": capsule_fps(device, h, w, c, blocks, batch, bf16,
                                                                   2 if args.tiny else 30)}
            res.save()
    if "wip" in parts:
        if over_budget():
            res.doc["wip"]["parity"] = {"skipped": "time budget spent"}
        else:
            log("wip parity (compiles the Triton kernel on CUDA)")
            res.doc["wip"]["parity"] = wip_parity(device, 64 if args.tiny else 512, 2 if args.tiny else 8, 128)
        res.save()
        for t in ((128,) if args.tiny else (1024, 2048, 4096)):  # rising cost: no size starts after the budget
            if over_budget():
                res.doc["wip"][f"T{t}"] = {"skipped": "time budget spent"}
                continue
            log(f"wip similarity T={t}")
            res.doc["wip"][f"T{t}"] = wip_similarity(device, t, 4 if args.tiny else 32, 128, 2 if args.tiny else 20,
                                                     device.type == "cuda", args.max_op_s)
            res.save()
    res.save()
    print(json.dumps({"wip": res.doc["wip"], "capsule": res.doc["capsule"], "elapsed_s": res.doc["elapsed_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
