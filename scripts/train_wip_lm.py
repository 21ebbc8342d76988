"""Train the small language model the WiP benchmarks measure, from text that ships with Python.

    python scripts/train_wip_lm.py                       # → plugins/wip/assets/wip-lm/ (~0.9M params)
    python scripts/train_wip_lm.py --steps 200 --out /tmp/lm   # a quick smoke run

A LLaMA-architecture decoder (RoPE, RMSNorm, SwiGLU, 2 KV heads for 4 query heads, tied embeddings) with the
bundled 1024-token BPE tokenizer, trained from scratch with AdamW (cosine schedule) on 128-token blocks of the
stdlib corpus (``plait.plugins.wip.corpus``). The output directory holds a ``save_pretrained`` checkpoint
(safetensors), the tokenizer, ``heldout.jsonl`` (the calib/eval texts, so evaluation does not depend on the
local Python version) and ``train_log.json`` (loss curve, eval perplexity, wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.wip.corpus import stdlib_documents, token_blocks, write_heldout
from plait.plugins.wip.lm import LM_CONFIG, LM_DIR, perplexity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=LM_DIR)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    docs = stdlib_documents()
    model, tok = build_causal_lm(arch="llama", config=dict(LM_CONFIG), tie_word_embeddings=True)
    train = token_blocks(tok, [t for _, s, t in docs if s == "train"], args.block)
    evals = token_blocks(tok, [t for _, s, t in docs if s == "eval"], args.block)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"documents {len(docs)}  train blocks {len(train)}  eval blocks {len(evals)}  params {n_params:,}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    warmup, log = max(1, args.steps // 20), []
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc="train", mininterval=5):
        lr = args.lr * (step / warmup if step <= warmup
                        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            log.append({"step": step, "loss": float(loss), "lr": lr})
    model.eval()
    ppl = perplexity(model, evals, batch_size=64)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    write_heldout(docs, args.out / "heldout.jsonl")
    summary = {"params": n_params, "steps": args.steps, "batch_size": args.batch_size, "block": args.block,
               "train_tokens": args.steps * args.batch_size * args.block, "train_blocks": len(train),
               "eval_blocks": len(evals), "eval_ppl": ppl, "wall_s": round(time.time() - start, 1), "log": log}
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
