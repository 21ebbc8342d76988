"""Where a FlashDP step's time goes on CPU: torch.profiler tables of the non-DP and the FlashDP per-layer step at
`benchmarks/flashdp/dp_speed.py`'s default shape (GPT-2 d 256, 2 layers, B 8, T 128, only Linear/Conv1D train).

    .venv/bin/python benchmarks/flashdp/profile_dp.py --out benchmarks/flashdp/profile_dp_after.txt

Writes one text file: per variant, the wall time of each profiled step and the top operators by self CPU time.
A profile, not a benchmark: the ratio with its interval comes from dp_speed.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    import dp_speed
    import torch
    from _common import profile_header, profile_section

    ap = dp_speed.argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dp_speed.add_model_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = profile_header(args.threads, f"GPT-2 d {args.d_model}, {args.layers} layers, batch {args.batch}, "
                                         f"seq {args.seq}", args.steps)
    for variant in ("non_dp", "flashdp"):
        runner = dp_speed.Runner(variant, args)
        lines.append(profile_section(variant, runner.step, lambda t: (*dp_speed.make_batch(t, args), t + 1),
                                     args.steps, args.rows))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
