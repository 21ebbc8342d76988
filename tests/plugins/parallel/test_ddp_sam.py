"""Transform chains with SAM under ``parallel: {name: ddp}`` on 2 gloo ranks equal 1 process at the same global
batch (the reference: the plain single-process run of the same config, no ``parallel:``).

* ``sam`` alone (sft): the ascent direction is the all-reduced gradient at w, the gradient at w + e is
  all-reduced again — every rank perturbs by the same e, as one process at the global batch does.
* DP-SAT (sft ``[sam, flashdp]`` / ``[sam, dp_flat]``, classify ``[sam, flashdp]`` on PiT, sam_train's own SAM
  before ``flashdp``): the ascent uses
  the previous step's noisy global gradient (identical on every rank: the noise is added once, after the
  all-reduce); the step at w + e is private DDP (each rank clips its share of the global Poisson draw).
  With ``reproducible_noise`` the losses and final parameters match one process within 1e-6, ε is the same.

Every case checks that the ascent acted (``sam/ascent_steps``) and that both ranks end bit-identical."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.plugins.parallel._runs import SFT_TINY as SFT
from tests.plugins.parallel._runs import config_file, launch_ranks, losses_by_step, only_run, run_overrides

STEPS = 10
HELPER = Path(__file__).with_name("_capture_rank.py")
SAM_TRAIN = """recipe: {name: sam_train, rho: 0.1, lr: 0.5, l2: 1.0e-2, batch_size: 16}
model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}
data: {name: digits, n_train: 64, n_test: 30, seed: 0}
"""
DP = "noise_multiplier: 0.8, max_grad_norm: 0.5, reproducible_noise: true"
CASES = {  # id: (config, grad_transform override, private, ascents expected: steps whose gradient was at w + e)
    "sft-sam": (SFT, "grad_transform={name: sam, rho: 0.2}", False, STEPS),
    "sft-dpsat-flashdp": (SFT, f"grad_transform=[{{name: sam, rho: 0.2}}, {{name: flashdp, {DP}}}]", True,
                          STEPS - 1),  # step 1 has no previous private gradient: a plain DP-SGD step
    "sft-dpsat-dp_flat": (SFT, f"grad_transform=[{{name: sam, rho: 0.2}}, {{name: dp_flat, {DP}}}]", True,
                          STEPS - 1),
    "sam_train-dpsat": (SAM_TRAIN, f"grad_transform={{name: flashdp, {DP}}}", True, STEPS - 1),
    "classify-dpsat": (None, f"grad_transform=[{{name: sam, rho: 0.2}}, {{name: flashdp, {DP}}}]", True,
                       STEPS - 1),
}
CLASSIFY = ["data.num_images=124", "data.min_per_class=3", "recipe.batch_size=8", "model.base_dims=[8,8,8]",
            "model.heads=[1,1,2]", "recipe.augment=false"]  # augmentation draws per example: per rank
RUN = run_overrides(3, STEPS)


def _launch(root: Path, cfg: str | None, transform: str, nproc: int) -> Path:
    path = config_file(root, cfg)
    extra = CLASSIFY if cfg is None else []
    launch_ranks(HELPER, [str(root), str(path), *extra, *RUN, f"run.out_dir={root / 'runs'}", transform], nproc)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sam_chain_two_ranks_equal_one_process(tmp_path, case):
    cfg, transform, private, ascents = CASES[case]
    one = _launch(tmp_path / "one", cfg, transform, 1)
    two = _launch(tmp_path / "two", cfg, transform, 2)
    ref, got = losses_by_step(only_run(one)), losses_by_step(only_run(two))
    assert len(ref) >= STEPS - 2 and ref.keys() == got.keys()  # (a Poisson draw may be empty: no loss logged)
    assert len(set(ref.values())) > 1  # it trained
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6 * abs(ref[s]), (s, ref, got)
    a, r0, r1 = (torch.load(root / f"rank{r}.pt") for root, r in ((one, 0), (two, 0), (two, 1)))
    assert a["params"].keys() == r0["params"].keys() == r1["params"].keys() and a["params"]
    for k, x in a["params"].items():
        torch.testing.assert_close(r0["params"][k], x, rtol=1e-6, atol=1e-6, msg=k)
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # every rank applies the identical update
    for s in (a["summary"], r0["summary"], r1["summary"]):
        assert s["sam/ascent_steps"] == ascents  # the ascent acted (not silently dropped) on every rank
        assert s["sam/mode"] == ("dp-sat" if private else "sam")
    if private:
        eps1, eps2 = a["summary"]["privacy/epsilon"], r0["summary"]["privacy/epsilon"]
        assert 0 < eps1 < float("inf") and eps2 == pytest.approx(eps1, rel=1e-12)
        assert r1["summary"]["privacy/epsilon"] == eps2
        assert r0["summary"]["privacy/sample_rate"] == a["summary"]["privacy/sample_rate"]
