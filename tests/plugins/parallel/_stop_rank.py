"""``plait run CONFIG [overrides]`` on one rank (started by torchrun) that sends itself SIGINT right after its own
training step ``AT`` (argv[1], a comma list: rank r's entry) — a Ctrl-C that reaches the ranks on either side
of a step's end, the race a terminal's Ctrl-C can lose. Exits with plait's code. Used by test_launcher.py; not a
test module."""
import os
import signal
import sys

from plait.cli import main
from plait.plugins.sam_if.sam_train_recipe import SAMTrainRecipe

at = int(sys.argv[1].split(",")[int(os.environ.get("RANK", "0"))])
_step = SAMTrainRecipe.train_step


def train_step(self, step):
    out = _step(self, step)
    if step == at:
        os.kill(os.getpid(), signal.SIGINT)  # handled at once (main thread): the stop flag is up for this check
    return out


SAMTrainRecipe.train_step = train_step
sys.exit(main(["run", *sys.argv[2:]]))
