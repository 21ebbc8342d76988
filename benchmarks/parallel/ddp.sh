#!/usr/bin/env bash
# First-order data parallelism on the GPUs of one node: `sft` steps/s and samples/s of each strategy in
# STRATEGIES (default: ddp) on all visible GPUs (torchrun, NCCL) against 1 GPU at the same global batch, plus the
# speedup, the ratio to the ideal (world x the 1-GPU samples/s) and each run's peak allocated GPU memory per rank
# (rank 0). One JSON object: $OUT/$NAME.json (NAME default <strategies>_gpu, e.g. ddp_gpu), also printed.
# With one GPU the strategy still runs, at world size 1 (torchrun --nproc-per-node 1), and the JSON says so
# ("world_size": 1, a "note"): it then measures the strategy's overhead, not scaling.
#
#   OUT=/some/dir bash benchmarks/parallel/ddp.sh                    # from the repository root, on the GPU machine
#   STRATEGIES="ddp fsdp" STEPS=30 OUT=/some/dir bash benchmarks/parallel/ddp.sh
#   DEVICE=cpu BACKEND=gloo NGPU=2 SHAPE=tiny STEPS=6 OUT=/tmp/x bash benchmarks/parallel/ddp.sh   # plumbing check on CPU
#
# Model: OPT with the 350M shape (hidden 1024, 24 layers, ffn 4096; random init, fp32, AdamW) unless SHAPE=tiny
# (the bundled tiny preset) or MODEL_CONFIG='{json}' (HF OPTConfig fields). Global batch BATCH (32) of the bundled
# synthetic_sentiment task. steps/s is the mean of the logged perf/steps_per_sec after the first window (start-up
# and the first steps excluded). BUDGET_S (default 600): no new run starts after it (the JSON keeps what finished).
# Extra arguments go to every `plait run` (e.g. parallel.mixed_precision.param_dtype=bf16 for fsdp only runs).
set -euo pipefail

OUT=${OUT:-$PWD/benchmarks-out}
PY=${PYTHON:-python}
STRATEGIES=${STRATEGIES:-ddp}
STEPS=${STEPS:-20}
BATCH=${BATCH:-32}
SHAPE=${SHAPE:-opt350m}
DEVICE=${DEVICE:-cuda}
BACKEND=${BACKEND:-auto}
BUDGET_S=${BUDGET_S:-600}
NAME=${NAME:-$(echo "$STRATEGIES" | tr ' ' '_')_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."                    # repository root
log() { echo "[${NAME} ${SECONDS}s] $*" >&2; }

if [ "$DEVICE" = cuda ]; then
    NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
    if [ "$NGPU" -lt 1 ]; then log "no GPU visible (nvidia-smi -L lists none); set DEVICE=cpu for a CPU check"; exit 2; fi
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
else
    NGPU=${NGPU:-2}
fi
case "$SHAPE" in
    opt350m) MODEL_CONFIG=${MODEL_CONFIG:-'{hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, ffn_dim: 4096, max_position_embeddings: 2048, dropout: 0.0, attention_dropout: 0.0}'} ;;
    tiny) MODEL_CONFIG=${MODEL_CONFIG:-'{dropout: 0.0, attention_dropout: 0.0}'} ;;
    *) log "SHAPE=$SHAPE: allowed opt350m, tiny (or set MODEL_CONFIG)"; exit 2 ;;
esac
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/cfg.yaml" <<EOF
run: {name: b, seed: 0, steps: $STEPS, log_every: 5, eval_every: 0, ckpt_every: 0, progress: false, device: $DEVICE}
recipe: {name: sft, optimizer: adamw, lr: 1.0e-4, batch_size: $BATCH, eval_examples: 8, max_grad_norm: 1.0}
model: {name: hf_causal_lm, arch: opt, size: tiny, config: $MODEL_CONFIG}
data: {name: synthetic_sentiment, n_train: 2048, n_eval: 8}
EOF
# the peak memory of rank 0, written next to its run directory when the run ends (a plugin-free wrapper)
cat > "$WORK/peak.py" <<'EOF'
import json, os, sys, runpy
import torch
sys.argv = ["plait", *sys.argv[1:]]
try:
    runpy.run_module("plait", run_name="__main__")
finally:
    if os.environ.get("RANK", "0") == "0" and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.environ["PEAK_FILE"], "w") as f:
            json.dump({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}, f)
EOF

# run NAME NPROC [plait overrides]: one measured run; appends its figures to $WORK/results.jsonl
run() {
    local name=$1 nproc=$2; shift 2
    if (( SECONDS > BUDGET_S )); then log "budget ${BUDGET_S}s spent: skipping $name"; return 0; fi
    log "$name: $( [ "$nproc" -gt 0 ] && echo "torchrun, $nproc process(es)" || echo "one process, no launcher")"
    local dir="$WORK/$name" rc=0
    mkdir -p "$dir"
    local launch=("$PY" "$WORK/peak.py")
    if [ "$nproc" -gt 0 ]; then
        launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$WORK/peak.py")
    fi
    PEAK_FILE="$dir/peak.json" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} "${launch[@]}" run "$WORK/cfg.yaml" \
        "run.out_dir=$dir/runs" "$@" > "$dir/stdout.txt" 2> "$dir/stderr.txt" || rc=$?
    if [ "$rc" -ne 0 ]; then
        log "$name failed (exit $rc): $(tail -n 3 "$dir/stderr.txt" | tr '\n' ' ')"
        echo "{\"name\": \"$name\", \"error\": \"exit $rc\"}" >> "$WORK/results.jsonl"
        return 0
    fi
    "$PY" - "$name" "$nproc" "$dir" >> "$WORK/results.jsonl" <<'EOF'
import json, sys
from pathlib import Path
name, nproc, d = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
(run_dir,) = list((d / "runs" / "b").iterdir())
rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
rates = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r][1:]
comm = [r["perf/comm_bytes"] for r in rows if "perf/comm_bytes" in r]
peak = json.loads((d / "peak.json").read_text()) if (d / "peak.json").is_file() else {}
print(json.dumps({"name": name, "world_size": max(nproc, 1), "steps_per_sec": sum(rates) / len(rates),
                  "comm_bytes_per_step": comm[-1] if comm else 0.0, **peak}))
EOF
}

: > "$WORK/results.jsonl"
BACKEND_ARG=()
[ "$BACKEND" != auto ] && BACKEND_ARG=("parallel.backend=$BACKEND")
run one 0 "$@"
for s in $STRATEGIES; do
    run "$s" "$NGPU" "parallel.name=$s" "parallel.timeout_s=300" "${BACKEND_ARG[@]}" "$@"
done

"$PY" - "$WORK/results.jsonl" "$BATCH" "$STEPS" "$SHAPE" "$NGPU" "$DEVICE" "$STRATEGIES" > "$OUT/$NAME.json" <<'EOF'
import json, sys
path, batch, steps, shape, ngpu, device, strategies = sys.argv[1:]
batch, ngpu = int(batch), int(ngpu)
rows = {r["name"]: r for r in (json.loads(x) for x in open(path) if x.strip())}
out = {"device": device, "world_size": ngpu, "global_batch": batch, "steps": int(steps), "model": f"OPT {shape}",
       "recipe": "sft, AdamW, fp32"}
if ngpu == 1:
    out["note"] = (f"one {'GPU' if device == 'cuda' else 'process'} for the strategies: they ran at world size 1 "
                   "(their overhead over the plain run, no scaling)")
one = rows.get("one", {})
if "steps_per_sec" in one:
    one["samples_per_sec"] = one["steps_per_sec"] * batch
out["one_gpu" if device == "cuda" else "one_process"] = one
for s in strategies.split():
    r = rows.get(s)
    if r is None:
        out[s] = {"skipped": "budget spent"}
        continue
    if "steps_per_sec" in r and "steps_per_sec" in one:
        r["samples_per_sec"] = r["steps_per_sec"] * batch
        r["speedup"] = r["steps_per_sec"] / one["steps_per_sec"]
        r["ratio_to_ideal"] = r["steps_per_sec"] / (ngpu * one["steps_per_sec"])
    out[s] = r
print(json.dumps(out))
EOF
cat "$OUT/$NAME.json"
