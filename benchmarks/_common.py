"""Helpers shared by the CPU benchmarks (``zo_*.py``, ``dp_*.py``, ...); not a benchmark itself.

Kept free of timing logic: model/data/engine construction only, so both scripts measure the same thing.
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import torch

# The MeZO hyper-parameters do not change the cost of a step; these are the test-suite defaults.
MEZO_ARGS = dict(eps=1e-3, lr=1e-6, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False,
                 no_decay=["bias", "norm", "ln_", "layernorm"], schedule="constant", warmup_steps=0)
LR = 1e-6
RUN_SEED = 0
CPU = torch.device("cpu")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(obj) -> None:
    """The one JSON object on stdout (indented; lists of numbers kept on one line)."""
    text = json.dumps(obj, indent=2)
    text = re.sub(r"\[\s*([-0-9.eE, \n]*?)\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    print(text, flush=True)


def choose_variants(spec: str, allowed, baselines: tuple[str, ...]) -> list[str]:
    """The comma-separated variants of ``spec``, checked against ``allowed``; the ``baselines`` every ratio
    needs are put first when missing. SystemExit naming the unknown ones."""
    chosen = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; allowed: {', '.join(allowed)}")
    for must in reversed(baselines):
        if must not in chosen:
            chosen.insert(0, must)
    return chosen


def make_mezo():
    from plait.plugins.zo2.mezo import MeZO

    return MeZO(**MEZO_ARGS)


# Published model shapes on top of a size preset (the bundled tokenizer keeps its own small vocabulary, so the
# embedding is smaller than the original's; the transformer blocks are the published ones).
SHAPES: dict[str, dict] = {
    "opt-350m": {"hidden_size": 1024, "word_embed_proj_dim": 1024, "ffn_dim": 4096, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "max_position_embeddings": 2048},
    "opt-1.3b": {"hidden_size": 2048, "word_embed_proj_dim": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "max_position_embeddings": 2048},
}


def build_model(arch: str, size: str, dtype: str = "float32", seed: int = 0, shape: str | None = None):
    """A freshly initialised model (same weights for the same seed), in eval mode (ZO steps run without dropout);
    ``shape`` (a `SHAPES` key) overrides the preset's block dimensions."""
    from plait.plugins.basics.models import build_causal_lm

    torch.manual_seed(seed)
    model, tok = build_causal_lm(arch=arch, size=size, dtype=dtype, config=SHAPES[shape] if shape else None)
    return model.eval(), len(tok)


def make_batch(step: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random token ids (seeded by ``step``); labels = ids with the first half masked (-100), as a prompt."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def zo2_engine(model, mezo, **overrides):
    """ZO2Engine on CPU; defaults: every block streamed from host memory, fp32 storage, overlap and bucket on."""
    from plait.plugins.zo2.fused import ZO2Engine

    args = dict(blocks=None, overlap=True, bucket=True, storage_dtype="fp32", pin_memory=False, disk_dir=None)
    args.update(overrides)
    return ZO2Engine(model, CPU, mezo, **args)


def model_bytes(model) -> int:
    """Bytes of the unique parameters (``parameters()`` de-duplicates tied tensors) in their current dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def block_bytes(model) -> int:
    from plait.plugins.basics.models import find_blocks

    _, layers = find_blocks(model)
    return sum(p.numel() * p.element_size() for p in layers.parameters())


# --- memory -------------------------------------------------------------------------------------------------
def _status(key: str) -> int | None:
    """A field of /proc/self/status in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int | None:
    return _status("VmRSS")


def hwm_kib() -> int | None:
    return _status("VmHWM")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``echo 5 > /proc/self/clear_refs``). ru_maxrss is not reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_kib() -> int:
    """Peak RSS of this process over its whole life (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# --- peak-RSS benchmarks: one child process a variant (dp_memory, zo_memory) ----------------------------------
def run_json_child(argv: list[str], variant: str, cwd, capture_stderr: bool = False) -> dict:
    """Run a variant's child (``argv``), which prints its result as the last stdout line (JSON); ``wall_s`` added.
    A failed child gives ``{"variant", "error", "wall_s"}``. With ``capture_stderr`` its stderr is kept: the
    progress lines (indented two spaces) are passed on, the whole tail where it failed, whose last line goes into
    the error."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None,
                          text=True, cwd=cwd)
    wall = round(time.perf_counter() - t0, 1)
    tail = ""
    if capture_stderr:
        sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "".join(
            line + "\n" for line in proc.stderr.splitlines() if line.startswith("  ")))
        tail = ": " + (proc.stderr.strip().splitlines()[-1:] or [""])[0]
    if proc.returncode != 0:
        return {"variant": variant, "error": f"child exited with {proc.returncode}{tail}"[:1500], "wall_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res



def run_variants(name: str, args, allowed, baselines: tuple[str, ...], run_variant, summarize) -> None:
    """The parent of a peak-RSS benchmark: ``run_variant(args, v)`` for each chosen variant (``--variants``, the
    ``baselines`` put first), ``summarize(args, results)`` with the total wall time added, emitted on stdout."""
    chosen = choose_variants(args.variants, allowed, baselines)
    t0 = time.perf_counter()
    results = {v: run_variant(args, v) for v in chosen}
    out = summarize(args, results)
    out["total_wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"[{name}] done in {out['total_wall_s']}s")
    emit(out)

def ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def rss_entry(r: dict, base: int | None) -> dict:
    """A variant's peaks in MiB: whole life and step phase, raw and above the baseline child (``base`` KiB),
    and the RSS after the build."""
    peak, step_peak = r.get("peak_rss_kib"), r.get("step_peak_rss_kib")
    return {
        "peak_rss_mib": mib(peak),
        "peak_above_baseline_mib": mib(peak - base) if peak is not None and base is not None else None,
        "step_peak_rss_mib": mib(step_peak),
        "step_peak_above_baseline_mib": mib(step_peak - base) if step_peak is not None and base is not None else None,
        "after_build_rss_mib": mib(r.get("after_build_rss_kib")),
    }


def rss_ratio(results: dict, num: str, den: str, key: str, base: int | None) -> dict:
    """``num``/``den`` of a peak (``key``): raw, and of the parts above the baseline child."""
    def kib(v):
        r = results.get(v, {})
        return None if "error" in r else r.get(key)

    a, b = kib(num), kib(den)
    return {"raw": ratio(a, b), "above_baseline": ratio(a - base, b - base) if None not in (a, b, base) else None}


def cpu_machine(**versions) -> dict:
    """The ``machine`` entry of a CPU benchmark: CPUs, platform, python, torch and ``versions`` (other libraries)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, **versions}


# --- profiles (profile_dp, profile_zo): torch.profiler tables, not benchmarks -------------------------------------
def profile_header(threads: int, shape: str, steps: int) -> list[str]:
    """The first lines of a profile file: the command, the time, load, torch, threads, ``shape``, step counts."""
    return [f"# {' '.join(sys.argv)}", f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
            f"load average {os.getloadavg()}, torch {torch.__version__}, {threads} threads, {shape}, "
            f"{steps} profiled steps after 2 warm-up"]


def profile_section(name: str, step, prepare, steps: int, rows: int) -> str:
    """``step(*prepare(r))`` for r = 0, 1 untimed, then r = 2 … steps + 1 under torch.profiler (CPU); ``prepare``
    runs before the clock starts. A heading with each profiled step's wall time, then the top ``rows`` operators by
    self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    for r in range(2):
        step(*prepare(r))
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(2, 2 + steps):
            inputs = prepare(r)
            t0 = time.perf_counter()
            step(*inputs)
            walls.append(time.perf_counter() - t0)
    return (f"\n## {name}: step wall ms {[round(w * 1e3, 1) for w in walls]}\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
