#!/usr/bin/env bash
# FSDP2 (`parallel: {name: fsdp}`) on the GPUs of one node against 1 GPU at the same global batch: sft steps/s,
# samples/s, speedup, ratio to the ideal and rank 0's peak allocated GPU memory (the sharding's saving: each rank
# holds 1/world of the parameters, gradients and AdamW moments). The measurement is benchmarks/parallel/ddp.sh with
# STRATEGIES=fsdp (default; STRATEGIES="ddp fsdp" compares both against one shared 1-GPU run); every variable of
# ddp.sh applies. One JSON object: $OUT/fsdp_gpu.json. With one GPU it runs at world size 1 and says so.
#
#   OUT=/some/dir bash benchmarks/parallel/fsdp.sh                   # from the repository root, on the GPU machine
#   OUT=/some/dir bash benchmarks/parallel/fsdp.sh parallel.mixed_precision.param_dtype=bf16   # extra plait overrides
# Multi-node: run the same `plait run … parallel.name=fsdp` under torchrun's rendezvous (docs/parallel.md).
set -euo pipefail
STRATEGIES=${STRATEGIES:-fsdp} exec bash "$(dirname "$0")/ddp.sh" "$@"
