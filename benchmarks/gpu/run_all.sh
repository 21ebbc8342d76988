#!/usr/bin/env bash
# The one prepared GPU check: ZO2 vs in-GPU MeZO on OPT-1.3B/2.7B/6.7B shapes (tokens/s, peak memory, overlap
# on/off) plus a ZO2 == InPlaceMeZO exactness check, written to $OUT/zo2_gpu.json (rewritten after every
# result, so a timeout still leaves the finished parts).
#
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh        # from the repository root, on the GPU machine
#
# Installs nothing when torch + transformers are importable (the engine is then imported from this checkout
# even if plait is not installed); otherwise `pip install -e .` against the torch already there.
# The whole script stays under 8 minutes: python gets what is left of TOTAL_S, hard-stopped by `timeout`,
# and it starts no new model size after its own --budget-s.
set -euo pipefail

TOTAL_S=${TOTAL_S:-470}                       # hard limit for everything below (< 8 min)
OUT=${OUT:-$PWD/benchmarks-out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."                    # repository root

log() { echo "[run_all ${SECONDS}s] $*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

if ! command -v "$PY" >/dev/null; then PY=python3; fi
if "$PY" -c "import torch, transformers" 2>/dev/null; then
    log "torch + transformers importable: installing nothing"
else
    log "torch/transformers missing: pip install -e . (keeping the installed torch)"
    timeout 180 "$PY" -m pip install -e . 2>&1 | tail -n 20 >&2 || log "pip install failed; trying anyway"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1 | tee "$OUT/versions.txt" >&2

left=$(( TOTAL_S - SECONDS ))
budget=$(( left - 150 ))                      # the last size may need ~2 min after it starts (6.7b)
(( budget < 60 )) && budget=60
log "running zo2_gpu.py (timeout ${left}s, budget ${budget}s)"
rc=0
timeout -k 10 "$left" "$PY" benchmarks/gpu/zo2_gpu.py --out "$OUT/zo2_gpu.json" --budget-s "$budget" "$@" \
    > "$OUT/zo2_gpu_summary.json" 2> >(tee "$OUT/zo2_gpu.log" >&2) || rc=$?
log "zo2_gpu.py exit status $rc (124: timed out; the JSON holds what finished)"
cat "$OUT/zo2_gpu_summary.json" 2>/dev/null || true
exit "$rc"
