#!/usr/bin/env bash
# DistZO2 on several GPUs of one node (NCCL): steps/s of pertp (2 GPUs), zo_ddp and zo_2d (NGPU GPUs) relative to
# one GPU at the same global batch, in-GPU MeZO and with ZO2 streaming (fp16 host copies), on OPT-1.3B and
# OPT-2.7B shapes (random init). With ZO2 also the sliced block upload (pertp_sliced, zo_ddp_sliced[, 2d_sliced]:
# each GPU uploads 1/k of a block over PCIe, an NCCL all-gather over NVLink completes it). Each configuration
# writes $OUT/dist_zo_<shape>_<offload>.json (one JSON object from benchmarks/distzo2/dist_zo.py). Needs at least 2
# GPUs; zo_2d needs 4. Not runnable on a single-GPU machine.
#
#   OUT=/some/dir bash benchmarks/distzo2/dist_zo.sh            # from the repository root, on the multi-GPU machine
#   NGPU=8 STEPS=30 OUT=/some/dir bash benchmarks/distzo2/dist_zo.sh
set -euo pipefail

OUT=${OUT:-$PWD/benchmarks-out}
PY=${PYTHON:-python}
STEPS=${STEPS:-20}
BATCH=${BATCH:-16}
SEQ=${SEQ:-256}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."                    # repository root
log() { echo "[dist_zo ${SECONDS}s] $*" >&2; }

if [ "${NGPU}" -lt 2 ]; then
    log "found ${NGPU} GPU(s); DistZO2 scaling needs at least 2"; exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
VARIANTS="single,pertp,zo_ddp"
if [ "${NGPU}" -ge 4 ] && [ $((NGPU % 2)) -eq 0 ]; then VARIANTS="$VARIANTS,zo_2d"; fi

declare -A SHAPES=(
  [opt1.3b]='{"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192, "max_position_embeddings": 2048}'
  [opt2.7b]='{"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32, "ffn_dim": 10240, "max_position_embeddings": 2048}'
)
status=0
for shape in opt1.3b opt2.7b; do
  for offload in none zo2; do
    variants=$VARIANTS
    if [ "$offload" = zo2 ]; then   # the sliced upload needs the streamed engine
      for v in ${VARIANTS//,/ }; do
        if [ "$v" != single ]; then variants="$variants,${v}_sliced"; fi
      done
    fi
    log "$shape offload=$offload variants=$variants nproc=$NGPU"
    "$PY" benchmarks/distzo2/dist_zo.py --device cuda --backend nccl --nproc "$NGPU" --variants "$variants" \
        --offload "$offload" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --size small \
        --model-config "${SHAPES[$shape]}" > "$OUT/dist_zo_${shape}_${offload}.json" || { status=$?; log "failed"; }
  done
done
exit $status
