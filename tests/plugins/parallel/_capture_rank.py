"""Run ``plait run CONFIG [overrides]`` in this process (one rank when started by torchrun) and save this rank's
final trainable parameters and the run summary to ``OUT/rank<R>.pt`` — what rank 0's checkpoint cannot show:
the parameters every *other* rank ends with. Used by test_private_ddp.py; not a test module."""
import os
import sys

import torch

from plait import step as step_mod
from plait.config import load_config
from plait.run import execute

steps = []
_init = step_mod.FirstOrderStep.__init__


def _capture(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    steps.append(self)


step_mod.FirstOrderStep.__init__ = _capture

out, cfg, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
run = execute(load_config(cfg, overrides))
(step,) = steps
params = {k: p.detach().clone() for k, p in step.model.named_parameters() if p.requires_grad}
torch.save({"params": params, "summary": dict(run.summary)}, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))
