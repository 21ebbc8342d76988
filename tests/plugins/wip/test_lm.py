"""On the bundled LM (trained by scripts/train_wip_lm.py): the model has learned something, the exact swap is
lossless, and calibration recovers much of the min-product gap while AdderNet L1 stays far behind."""
from __future__ import annotations

import copy
import math

import pytest

from plait.plugins.wip.attention import swap_attention
from plait.plugins.wip.lm import LM_DIR, heldout_blocks, load_lm, perplexity
from plait.plugins.wip.recovery import calibrate

pytestmark = pytest.mark.skipif(not (LM_DIR / "config.json").is_file(), reason="bundled LM not built")


@pytest.fixture(scope="module")
def lm():
    model, tok = load_lm()
    return model, heldout_blocks(tok, "calib", 128, limit=16), heldout_blocks(tok, "eval", 128, limit=16)


def test_bundled_lm_has_learned_the_corpus(lm):
    model, _, evals = lm
    ppl = perplexity(model, evals)
    assert ppl < 40  # a uniform guess over the 1024-token vocabulary scores 1024
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


@pytest.mark.slow
def test_recovery_on_the_trained_lm(lm):
    model, calib, evals = lm
    base = perplexity(model, evals)
    assert perplexity(swap_attention(copy.deepcopy(model), "exact"), evals) == pytest.approx(base, rel=1e-6)
    ppl = {}
    for op in ("l1", "minprod", "mitchell"):
        swapped = swap_attention(copy.deepcopy(model), op)
        before = perplexity(swapped, evals)
        if op != "mitchell":
            calibrate(swapped, calib)
        ppl[op] = (before, perplexity(swapped, evals) if op != "mitchell" else before)
    gap = {op: (b - base, a - base) for op, (b, a) in ppl.items()}
    assert gap["minprod"][1] < 0.5 * gap["minprod"][0]  # calibration closes more than half of the gap
    assert gap["minprod"][1] < 0.25 * gap["l1"][1]  # and leaves min-product far ahead of AdderNet L1
    assert gap["l1"][1] > 0.8 * gap["l1"][0]  # L1 is a different kernel: a scale cannot fix it
    assert ppl["mitchell"][0] < 1.05 * base  # ≤ 11 % error per product: nearly lossless without calibration
    assert all(math.isfinite(v) for pair in ppl.values() for v in pair)
