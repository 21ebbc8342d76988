"""Where a ZO step's time goes: torch.profiler tables of the in-place MeZO step and the ZO2 host-tier step at
`benchmarks/zo2/zo_speed.py`'s default shape (OPT "small", batch 8, seq 128, 2 threads), plus the compute floor
(two no-grad forwards of the same batch) for scale.

    .venv/bin/python benchmarks/zo2/profile_zo.py --out benchmarks/zo2/profile_zo_after.txt

Writes one text file: per variant, the wall time of each profiled step and the top operators by self CPU
time. A profile, not a benchmark: the ratios with their intervals come from zo_speed.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from _common import LR, RUN_SEED, build_model, make_batch, make_mezo, profile_header, profile_section, zo2_engine

    from plait.plugins.zo2.mezo import InPlaceMeZO, step_seed

    lines = profile_header(args.threads, f"OPT {args.size}, batch {args.batch}, seq {args.seq}", args.steps)
    model, vocab = build_model("opt", args.size)
    floor = build_model("opt", args.size)[0]

    def floor_step(r):
        with torch.no_grad():
            b = make_batch(r, args.batch, args.seq, vocab)
            floor(**b)
            floor(**b)

    engines = {"floor": floor_step}
    mezo_eng = InPlaceMeZO(model, torch.device("cpu"), make_mezo())
    engines["mezo"] = lambda r: mezo_eng.step(make_batch(r, args.batch, args.seq, vocab), step_seed(RUN_SEED, r), LR)
    zo2_eng = zo2_engine(build_model("opt", args.size)[0], make_mezo())
    engines["zo2"] = lambda r: zo2_eng.step(make_batch(r, args.batch, args.seq, vocab), step_seed(RUN_SEED, r), LR)
    for name, fn in engines.items():  # each engine makes its batch inside the timed step
        lines.append(profile_section(name, fn, lambda r: (r,), args.steps, args.rows))
    mezo_eng.close()
    zo2_eng.close()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
