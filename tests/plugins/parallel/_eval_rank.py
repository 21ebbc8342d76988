"""Run ``plait run CONFIG [overrides]`` in this process (one rank when started by torchrun) and save this rank's
evaluation results and the shares ddp handed it to ``OUT/eval<R>.pt``: every ``eval_share(n, align)`` call's
range, and the run's first and final evaluation (every rank computes the reduced metrics). Used by
test_ddp_eval.py; not a test module."""
import os
import sys

import torch

from plait.config import load_config
from plait.plugins.parallel.ddp import DDP
from plait.run import execute

shares = []
_share = DDP.eval_share


def _record(self, n, align=1):
    out = _share(self, n, align)
    shares.append((n, out.start, out.stop))
    return out


DDP.eval_share = _record

out, cfg, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
run = execute(load_config(cfg, overrides))
torch.save({"shares": shares, "first_eval": run.summary["first_eval"], "final_eval": run.summary["final_eval"]},
           os.path.join(out, f"eval{os.environ.get('RANK', '0')}.pt"))
