"""Where a FlashDP step's time goes on CPU: torch.profiler tables of the non-DP and the FlashDP per-layer step at
`benchmarks/flashdp/dp_speed.py`'s default shape (GPT-2 d 256, 2 layers, B 8, T 128, only Linear/Conv1D train).

    .venv/bin/python benchmarks/flashdp/profile_dp.py --out benchmarks/flashdp/profile_dp_after.txt

Writes one text file: per variant, the wall time of each profiled step and the top operators by self CPU time.
A profile, not a benchmark: the ratio with its interval comes from dp_speed.py.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    import dp_speed
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = dp_speed.argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dp_speed.add_model_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"# {' '.join(sys.argv)}", f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
             f"load average {os.getloadavg()}, torch {torch.__version__}, {args.threads} threads, GPT-2 d "
             f"{args.d_model}, {args.layers} layers, batch {args.batch}, seq {args.seq}, {args.steps} profiled steps "
             f"after 2 warm-up"]
    for variant in ("non_dp", "flashdp"):
        runner = dp_speed.Runner(variant, args)
        for t in range(2):
            runner.step(*dp_speed.make_batch(t, args), t + 1)
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for t in range(2, 2 + args.steps):
                ids, pos = dp_speed.make_batch(t, args)
                t0 = time.perf_counter()
                runner.step(ids, pos, t + 1)
                walls.append(time.perf_counter() - t0)
        lines.append(f"\n## {variant}: step wall ms {[round(w * 1e3, 1) for w in walls]}")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
