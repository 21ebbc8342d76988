#!/usr/bin/env bash
# The one prepared GPU check, in three parts, each with its own time budget:
#   zo2  ZO2 vs in-GPU MeZO on OPT-1.3B/2.7B/6.7B shapes (tokens/s, peak memory, overlap on/off) plus a ZO2 ==
#        InPlaceMeZO exactness check -> $OUT/zo2_gpu.json
#   dp   FlashDP (compiled Triton clip-sum kernels) vs non-DP and Opacus per-layer on GPT-2-medium and LLaMA-1B
#        shapes (tokens/s, peak memory; bf16 autocast, bf16 weights, fp32) plus a Triton-vs-fp64 gradient check
#        -> $OUT/dp_gpu.json
#   sampling  Infinite-Sampling schedulers on a Qwen3-1.7B-shaped bf16 model with scripted lengths: peak
#        allocated memory and tokens/s of full_group / micro_group / continuous / length_aware
#        -> $OUT/sampling_gpu.json
# Each JSON is rewritten after every result, so a timeout still leaves the finished parts.
#
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh        # from the repository root, on the GPU machine
#   PARTS=dp OUT=/some/dir bash benchmarks/gpu/run_all.sh   # only the DP part (DP_S=... to give it more time)
#
# Installs nothing when torch + transformers are importable (the engine/flashdp is then imported from this
# checkout even if plait is not installed); otherwise, on a machine with nvidia-smi, `pip install -e .` against
# the torch already there, and elsewhere it stops (exit 2) rather than pull a CUDA torch into $PYTHON.
# The whole script stays under 8 minutes: TOTAL_S (470 s) is the hard limit; zo2 gets ZO2_S (210 s), dp
# DP_S (140 s) and sampling SAMPLING_S (110 s), each cut to what is left of TOTAL_S and hard-stopped by
# `timeout`; each python script also starts no new model size/variant after its own --budget-s. Extra
# arguments go to zo2_gpu.py; DP_ARGS to dp_gpu.py, SAMPLING_ARGS to sampling_gpu.py. The exit status is the
# first non-zero one.
set -euo pipefail

TOTAL_S=${TOTAL_S:-470}                       # hard limit for everything below (< 8 min)
ZO2_S=${ZO2_S:-210}                           # time for the zo2 part
DP_S=${DP_S:-140}                             # time for the dp part
SAMPLING_S=${SAMPLING_S:-110}                 # time for the sampling part
PARTS=${PARTS:-"zo2 dp sampling"}
OUT=${OUT:-$PWD/benchmarks-out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."                    # repository root

log() { echo "[run_all ${SECONDS}s] $*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

if ! command -v "$PY" >/dev/null; then PY=python3; fi
if "$PY" -c "import torch, transformers" 2>/dev/null; then
    log "torch + transformers importable: installing nothing"
elif ! command -v nvidia-smi >/dev/null; then
    # not the GPU machine: installing here would pull a multi-GB CUDA torch into whatever $PY is
    log "torch/transformers missing for $PY and no GPU here: set PYTHON=.venv/bin/python (nothing installed)"
    exit 2
else
    log "torch/transformers missing: pip install -e . (keeping the installed torch)"
    timeout 180 "$PY" -m pip install -e . 2>&1 | tail -n 20 >&2 || log "pip install failed; trying anyway"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1 | tee "$OUT/versions.txt" >&2

status=0
if [[ " $PARTS " == *" zo2 "* ]]; then
    left=$(( TOTAL_S - SECONDS ))
    [[ " $PARTS " == *" dp "* ]] && left=$(( left - DP_S ))   # keep the later parts' shares
    [[ " $PARTS " == *" sampling "* ]] && left=$(( left - SAMPLING_S ))
    (( left > ZO2_S )) && left=$ZO2_S
    budget=$(( left - 150 ))                  # the last size may need ~2 min after it starts (6.7b)
    (( budget < 60 )) && budget=60
    log "running zo2_gpu.py (timeout ${left}s, budget ${budget}s)"
    rc=0
    timeout -k 10 "$left" "$PY" benchmarks/gpu/zo2_gpu.py --out "$OUT/zo2_gpu.json" --budget-s "$budget" "$@" \
        > "$OUT/zo2_gpu_summary.json" 2> >(tee "$OUT/zo2_gpu.log" >&2) || rc=$?
    log "zo2_gpu.py exit status $rc (124: timed out; the JSON holds what finished)"
    cat "$OUT/zo2_gpu_summary.json" 2>/dev/null || true
    (( status == 0 )) && status=$rc
fi
if [[ " $PARTS " == *" dp "* ]]; then
    left=$(( TOTAL_S - SECONDS - 5 ))
    [[ " $PARTS " == *" sampling "* ]] && left=$(( left - SAMPLING_S ))
    (( left > DP_S )) && left=$DP_S
    budget=$(( left - 45 ))                   # the last variant (LLaMA-1B fp32 Opacus) may need ~40 s
    (( budget < 30 )) && budget=30
    if (( left < 30 )); then
        log "no time left for dp_gpu.py (${left}s)"
        (( status == 0 )) && status=124
    else
        log "running dp_gpu.py (timeout ${left}s, budget ${budget}s)"
        rc=0
        # shellcheck disable=SC2086
        timeout -k 10 "$left" "$PY" benchmarks/gpu/dp_gpu.py --out "$OUT/dp_gpu.json" --budget-s "$budget" \
            ${DP_ARGS:-} > "$OUT/dp_gpu_summary.json" 2> >(tee "$OUT/dp_gpu.log" >&2) || rc=$?
        log "dp_gpu.py exit status $rc (124: timed out; the JSON holds what finished)"
        cat "$OUT/dp_gpu_summary.json" 2>/dev/null || true
        (( status == 0 )) && status=$rc
    fi
fi
if [[ " $PARTS " == *" sampling "* ]]; then
    left=$(( TOTAL_S - SECONDS - 5 ))
    (( left > SAMPLING_S )) && left=$SAMPLING_S
    budget=$(( left - 40 ))
    (( budget < 30 )) && budget=30
    if (( left < 45 )); then
        log "no time left for sampling_gpu.py (${left}s)"
        (( status == 0 )) && status=124
    else
        log "running sampling_gpu.py (timeout ${left}s, budget ${budget}s)"
        rc=0
        # shellcheck disable=SC2086
        timeout -k 10 "$left" "$PY" benchmarks/gpu/sampling_gpu.py --out "$OUT/sampling_gpu.json" \
            --budget-s "$budget" ${SAMPLING_ARGS:-} > "$OUT/sampling_gpu_summary.json" \
            2> >(tee "$OUT/sampling_gpu.log" >&2) || rc=$?
        log "sampling_gpu.py exit status $rc (124: timed out; the JSON holds what finished)"
        cat "$OUT/sampling_gpu_summary.json" 2>/dev/null || true
        (( status == 0 )) && status=$rc
    fi
fi
exit "$status"
