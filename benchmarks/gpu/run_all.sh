#!/usr/bin/env bash
# The one prepared GPU check, in five parts, each with its own time budget:
#   zo2  ZO2 vs in-GPU MeZO on OPT-1.3B/2.7B/6.7B shapes (tokens/s, peak memory, overlap on/off) plus a ZO2 ==
#        InPlaceMeZO exactness check -> $OUT/zo2_gpu.json
#   dp   FlashDP (compiled Triton clip-sum kernels) vs non-DP and Opacus per-layer on GPT-2-medium and LLaMA-1B
#        shapes (tokens/s, peak memory; bf16 autocast, bf16 weights, fp32) plus a Triton-vs-fp64 gradient check
#        -> $OUT/dp_gpu.json
#   sampling  Infinite-Sampling schedulers on a Qwen3-1.7B-shaped bf16 model with scripted lengths: peak
#        allocated memory and tokens/s of full_group / micro_group / continuous / length_aware
#        -> $OUT/sampling_gpu.json
#   small  capsule V2-SfMLearner inference frames/s (64x80, 256x320; fp32/bf16; first, it is quick) and the WiP
#        min-product Triton kernel vs exact matmul and the cdist path, with a parity check -> $OUT/capsule_wip_gpu.json
#   dist  first-order data parallelism (benchmarks/parallel/ddp.sh, STRATEGIES="fsdp ddp"): sft on an OPT-350M shape,
#        each strategy on all visible GPUs vs 1 GPU at the same global batch (samples/s, speedup, ratio to ideal,
#        rank 0's peak memory); with one GPU at world size 1, said so in the JSON -> $OUT/dist_fo_gpu.json
# Each JSON is rewritten after every result, so a timeout still leaves the finished parts.
#
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh        # from the repository root, on the GPU machine
#   PARTS=dp OUT=/some/dir bash benchmarks/gpu/run_all.sh   # only the DP part (it may then use all of TOTAL_S)
#   PARTS=dist OUT=/some/dir bash benchmarks/gpu/run_all.sh # only ddp/fsdp (on a multi-GPU node: all its GPUs)
#
# Installs nothing when torch + transformers are importable (the engine/flashdp is then imported from this
# checkout even if plait is not installed); otherwise, on a machine with nvidia-smi, `pip install -e .` against
# the torch already there, and elsewhere it stops (exit 2) rather than pull a CUDA torch into $PYTHON.
# The whole script stays under 8 minutes: TOTAL_S (470 s) is the hard limit. Each part may run until only the
# later parts' shares are left of TOTAL_S (5 s kept spare), so a part gets its share plus whatever the earlier
# parts left unused, and it is hard-stopped there by `timeout`. Shares: zo2 ZO2_S (90 s), dp DP_S (170 s),
# sampling SAMPLING_S (110 s), small SMALL_S (54 s), dist DIST_S (25 s, last: it also gets what the others left);
# they add up to 449 s, the 470 s less ~16 s of setup and the 5 s spare (dist's 25 s came out of zo2's 115 s:
# zo2 took 45 s for 1.3b + 2.7b on the first H200 run, and 6.7b, ~2.5x the 2.7b work, still fits 90 s). dist
# needs ~15-20 s per plait launch (3 launches: 1 GPU, fsdp, ddp) and starts no launch after its budget. Each python script starts no new model size/variant after its --budget-s, which is the part's time
# less TAIL: what the last item started before the budget may still need, plus ~8 s of interpreter start/exit.
# The shares and tails follow the first H200 run (2026-12-04): zo2 took 45 s for 1.3b + 2.7b (6.7b, ~2.5x the
# 2.7b work, was skipped: its old 150 s tail left a 34 s budget); dp needed ~90 s for 3 of its 6 configs (the
# first flashdp step compiles for 30 s); small hit its 35 s limit in the WiP timings at T=4096 (20 timed calls
# of a cdist path that took 0.35 s a call already at T=2048; now capped per op, and the capsule part runs first).
# Extra arguments go to zo2_gpu.py; DP_ARGS to dp_gpu.py, SAMPLING_ARGS to sampling_gpu.py, SMALL_ARGS to
# capsule_wip_gpu.py, DIST_ARGS (plait overrides) to ddp.sh. The exit status is the first non-zero one.
set -euo pipefail

TOTAL_S=${TOTAL_S:-470}                       # hard limit for everything below (< 8 min)
ZO2_S=${ZO2_S:-90}                            # time for the zo2 part
DP_S=${DP_S:-170}                             # time for the dp part
SAMPLING_S=${SAMPLING_S:-110}                 # time for the sampling part
SMALL_S=${SMALL_S:-54}                        # time for the small part (capsule + wip)
DIST_S=${DIST_S:-25}                          # time for the dist part (ddp / fsdp; plus what the others left)
PARTS=${PARTS:-"zo2 dp sampling small dist"}
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

# part -> script, time share, and the seconds its last item may still need after the script's --budget-s
# (paths under benchmarks/: each method's GPU script sits beside its CPU scripts; capsule_wip_gpu.py serves two)
declare -A SCRIPT=([zo2]=zo2/zo2_gpu.py [dp]=flashdp/dp_gpu.py [sampling]=infinite_sampling/sampling_gpu.py
                   [small]=gpu/capsule_wip_gpu.py [dist]=parallel/ddp.sh)
declare -A SHARE=([zo2]=$ZO2_S [dp]=$DP_S [sampling]=$SAMPLING_S [small]=$SMALL_S [dist]=$DIST_S)
# zo2: one 6.7b variant (ZO2 engine build ~12 s + 13 steps); dp: a first flashdp step that compiles (30 s);
# sampling: one variant after the first (<= 850 decode steps); small: the T=4096 WiP timings (calls capped);
# dist: one plait launch (start-up, OPT-350M build, 20 steps)
declare -A TAIL=([zo2]=40 [dp]=45 [sampling]=40 [small]=15 [dist]=25)
declare -A EXTRA=([zo2]="$*" [dp]="${DP_ARGS:-}" [sampling]="${SAMPLING_ARGS:-}" [small]="${SMALL_ARGS:-}"
                  [dist]="${DIST_ARGS:-}")
ORDER=(zo2 dp sampling small dist)

status=0
for i in "${!ORDER[@]}"; do
    part=${ORDER[$i]}
    [[ " $PARTS " == *" $part "* ]] || continue
    left=$(( TOTAL_S - SECONDS - 5 ))
    for later in "${ORDER[@]:$((i + 1))}"; do             # keep the later parts' shares
        [[ " $PARTS " == *" $later "* ]] && left=$(( left - SHARE[$later] ))
    done
    budget=$(( left - TAIL[$part] ))              # left: this part's share + what earlier parts did not use
    (( budget < 20 )) && budget=20
    if (( left < TAIL[$part] + 20 )); then
        log "no time left for ${SCRIPT[$part]} (${left}s)"
        (( status == 0 )) && status=124
        continue
    fi
    log "running ${SCRIPT[$part]} (timeout ${left}s, budget ${budget}s)"
    rc=0
    name=$(basename "${SCRIPT[$part]}" .py)
    if [ "$part" = dist ]; then                   # a shell script: its JSON is $OUT/dist_fo_gpu.json
        name=dist_fo_gpu
        # shellcheck disable=SC2086
        NAME=$name STRATEGIES="fsdp ddp" BUDGET_S=$budget PYTHON="$PY" OUT="$OUT" timeout -k 10 "$left" \
            bash "benchmarks/${SCRIPT[$part]}" ${EXTRA[$part]} > "$OUT/${name}_summary.json" \
            2> >(tee "$OUT/$name.log" >&2) || rc=$?
    else
        # shellcheck disable=SC2086
        timeout -k 10 "$left" "$PY" "benchmarks/${SCRIPT[$part]}" --out "$OUT/$name.json" --budget-s "$budget" \
            ${EXTRA[$part]} > "$OUT/${name}_summary.json" 2> >(tee "$OUT/$name.log" >&2) || rc=$?
    fi
    log "${SCRIPT[$part]} exit status $rc (124: timed out; the JSON holds what finished)"
    cat "$OUT/${name}_summary.json" 2>/dev/null || true
    (( status == 0 )) && status=$rc
done
exit "$status"
