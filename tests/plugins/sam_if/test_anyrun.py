"""``plait attribute RUN estimator=tracin`` on sft runs of the tiny OPT: TracIn over the run's checkpoints.

Reference: the checkpoints read straight from disk (`Checkpointer.load`), loaded into the rebuilt model, and
Σ_c η_c ‖∇ℓ_i(w_c)‖² by per-example torch.autograd, with η_c = lr·(steps since the previous checkpoint)/(1 − μ)
from the config by hand (constant schedule).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from plait.cli import main
from tests.plugins.sam_if._runs import SFT_ETA, SFT_RUN, hand_self_influence, rebuilt

DP = "grad_transform: {name: flashdp, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"


def _train(tmp_path: Path, ckpt: int = 1, extra: str = "", name: str = "c.yaml") -> Path:
    cfg = tmp_path / name
    out = tmp_path / name.replace(".yaml", "")
    cfg.write_text(SFT_RUN.format(ckpt=ckpt, keep=0, out=out, extra=extra))
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "a").iterdir()
    return run_dir


def test_sft_tracin_over_checkpoints_equals_hand_sum(tmp_path, fresh_host):
    from safetensors.torch import load_file

    fresh_host()
    run_dir = _train(tmp_path)
    assert main(["attribute", str(run_dir), "estimator=tracin", "--top", "3"]) == 0
    got = load_file(str(run_dir / "attribution" / "tracin" / "scores.safetensors"))["self_influence"]
    report = json.loads((run_dir / "attribution" / "tracin" / "report.json").read_text())
    assert report["checkpoints"] == [1, 2, 3] and len(report["top"]) == 3 and report["top"][0]["text"]

    ref = hand_self_influence(run_dir, 12, SFT_ETA)
    assert torch.allclose(got, ref, rtol=1e-4, atol=0)  # fp32 model: gradients to ~1e-6 relative


def test_refusals_are_one_line(tmp_path, fresh_host, capsys):
    fresh_host()
    dp_run = _train(tmp_path, extra=DP, name="dp.yaml")
    capsys.readouterr()
    assert main(["attribute", str(dp_run), "estimator=tracin"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-private-data" in err and "not differentially private" in err and len(err.splitlines()) == 1
    assert main(["attribute", str(dp_run), "estimator=tracin", "k=64", "params=[model.decoder.layers.1.*]", "--allow-private-data"]
                ) == 0
    assert "not private" in (dp_run / "attribution" / "tracin" / "report.md").read_text()
    for opts, match in [(["estimator=sam_hessian"], "needs a run trained with SAM"),
                        (["estimator=tracin", "params=[nothing.*]"], "match no parameter"),
                        (["estimator=tracin", "kk=3"], "no option 'kk'"),
                        (["estimator=tracin", "projection=sparse"], "allowed: rademacher")]:
        assert main(["attribute", str(dp_run), *opts, "--allow-private-data"]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (opts, err)
    empty = tmp_path / "no_ckpt"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((dp_run / "config.yaml").read_text())
    assert main(["attribute", str(empty)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["attribute", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_tied_lm_head_is_matched_through_the_shared_weight(tmp_path, fresh_host):
    from safetensors.torch import load_file

    from plait.checkpoint import Checkpointer
    from plait.plugins.sam_if.projected import select_params, tied_aliases

    fresh_host()
    run_dir = _train(tmp_path)
    recipe, *_ = rebuilt(run_dir)
    model = recipe.model
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # OPT ties them
    assert "lm_head.weight" in tied_aliases(model)
    (name, p), = select_params(model, ["lm_head.*"])
    assert p is model.lm_head.weight and name == "model.decoder.embed_tokens.weight"
    assert main(["attribute", str(run_dir), "estimator=tracin", "params=[lm_head.*]"]) == 0
    got = load_file(str(run_dir / "attribution" / "tracin" / "scores.safetensors"))["self_influence"]
    ref = torch.zeros(12, dtype=torch.float64)
    for path in Checkpointer(run_dir / "checkpoints").complete():
        _, state = Checkpointer.load(path)
        model.load_state_dict(state["task"]["model"])
        model.eval()
        for i in range(12):
            (g,) = torch.autograd.grad(recipe.sample_losses([i])[0], [model.lm_head.weight])
            ref[i] += 1e-2 / (1 - 0.9) * float((g.double() ** 2).sum())
    assert torch.allclose(got, ref, rtol=1e-5, atol=0)  # fp32 model: sums in fp32 vs fp64
