"""Write a randomly initialised causal LM as a sharded directory, one block at a time (never the whole model).

The directory is what the zo2 disk tier streams from (``model: {name: zo2_shards, path: DIR}``), so a model
larger than RAM can be fine-tuned with ZO2. Example: an OPT-13B-shaped fp16 model (~26 GB on disk):

    python scripts/make_shards.py --arch opt --out /data/opt13b --dtype fp16 \\
        --config '{"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480}'
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from plait.plugins.zo2.shards import write_sharded_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="opt", choices=["opt", "qwen3", "llama"])
    ap.add_argument("--size", default="tiny", help="size preset the --config keys override")
    ap.add_argument("--config", default="{}", help="JSON object of HF config overrides")
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        print(f"error: --config is not JSON: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()

    def progress(i, n):
        print(f"\rblock {i}/{n}  {time.time() - t0:.0f}s", end="", file=sys.stderr, flush=True)

    out = write_sharded_model(args.out, args.arch, args.size, config, args.dtype, args.seed, progress)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
