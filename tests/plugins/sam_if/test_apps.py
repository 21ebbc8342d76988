"""Apps of ``plait attribute`` on any first-order run (`apps`, `anyrun`): train × test scores (``--test``), the
``influence:`` section's ``against: eval`` and editing (``--remove K``) on sft runs of the tiny OPT and a classify
run of a tiny PiT.

References: train × test scores — a hand loop over the checkpoint files (`Checkpointer.load`) of per-example
gradient dot products, η_c = lr/(1 − μ) per one-step interval (constant schedule), fp64 model; retraining —
``plait run`` of the same config on a jsonl file without the removed rows (the final checkpoint's weights);
editing — a constructed case where the harmful examples are known: copies of the target prompt with the wrong
completion; ``estimator=ekfac`` on sequence inputs — the large-damping limit λ·score → G_j·G_t of the chosen
layer's per-example gradients (torch.autograd).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.cli import main
from tests.plugins.sam_if._runs import rebuilt, train_classify_pit

RUN = """
run: {{name: a, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: {ckpt}, keep_checkpoints: 0,
      out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: sft, optimizer: sgd, momentum: {momentum}, lr: {lr}, batch_size: 4, eval_batch_size: 8, max_grad_norm: 0}}
model: {{name: hf_causal_lm, arch: opt, size: tiny, dtype: float64}}
data: {data}
{extra}
"""
SENTIMENT = "{name: synthetic_sentiment, n_train: 12, n_eval: 3}"


def _run(tmp_path: Path, name: str, data: str = SENTIMENT, extra: str = "", steps: int = 3, lr: float = 1e-2,
         momentum: float = 0.9, ckpt: int = 1) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    out = tmp_path / name
    cfg.write_text(RUN.format(out=out, data=data, extra=extra, steps=steps, lr=lr, momentum=momentum, ckpt=ckpt))
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "a").iterdir()
    return run_dir


def _hand_scores(run_dir: Path, eta: float, test_losses, n_test: int) -> torch.Tensor:
    """Σ_c η ∇ℓ_j(w_c)·∇ℓ_t(w_c), one example at a time, every parameter, fp64."""
    from plait.checkpoint import Checkpointer

    recipe, *_ = rebuilt(run_dir)
    model = recipe.model
    params = list(model.parameters())
    n = recipe.step.dataset_size
    ref = torch.zeros(n, n_test, dtype=torch.float64)

    def grads(loss):
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    for path in Checkpointer(run_dir / "checkpoints").complete():
        _, state = Checkpointer.load(path)
        model.load_state_dict(state["task"]["model"])
        model.eval()
        gt = [grads(test_losses(recipe, model, t)) for t in range(n_test)]
        for j in range(n):
            gj = grads(recipe.sample_losses([j])[0])
            for t in range(n_test):
                ref[j, t] += eta * sum(float((a.double() * b.double()).sum()) for a, b in zip(gj, gt[t]))
    return ref


def _lm_eval_loss(recipe, model, t):
    from plait.plugins.basics.data import collate
    from plait.plugins.basics.sft_recipe import sample_losses

    return sample_losses(model, collate([recipe.eval_items[t]], recipe.tokenizer.pad_token_id))[0]


def test_sft_train_by_test_scores_equal_hand_loop_and_section(tmp_path, fresh_host):
    from safetensors.torch import load_file

    fresh_host()
    run_dir = _run(tmp_path, "s", extra="influence: {name: tracin, against: eval, top: 3}")
    assert main(["attribute", str(run_dir), "estimator=tracin", "--test", "eval", "--top", "2"]) == 0
    got = load_file(str(run_dir / "attribution" / "tracin" / "scores.safetensors"))
    assert got["scores"].shape == (12, 3) and got["scores"].dtype == torch.float64
    ref = _hand_scores(run_dir, 1e-2 / (1 - 0.9), _lm_eval_loss, 3)
    assert torch.allclose(got["scores"], ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
    report = json.loads((run_dir / "attribution" / "tracin" / "report.json").read_text())
    assert report["n_test"] == 3 and len(report["per_test"]) == 3
    col = ref[:, 1]
    assert [r["index"] for r in report["per_test"][1]["proponents"]] == torch.argsort(col, descending=True)[:2].tolist()
    assert [r["index"] for r in report["per_test"][1]["opponents"]] == torch.argsort(col)[:2].tolist()
    md = (run_dir / "attribution" / "tracin" / "report.md").read_text()
    assert md.count("## test ") == 3
    # the influence: section with against: eval wrote the same matrix at the end of training
    section = load_file(str(run_dir / "attribution" / "scores.safetensors"))["scores"]
    assert torch.allclose(section, got["scores"], rtol=1e-10, atol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attribution"]["against"] == "eval"
    assert summary["attribution"]["top"] == torch.argsort(ref.mean(1))[:3].tolist()


def test_classify_pit_scores_against_test_split_and_file(tmp_path, fresh_host):
    from safetensors.torch import load_file, save_file

    fresh_host()
    run_dir = train_classify_pit(tmp_path, 24, recipe=", warmup_steps: 0")
    recipe, *_ = rebuilt(run_dir)
    te = recipe.data.test
    save_file({"x": te.x[:2].contiguous(), "y": te.y[:2].contiguous()}, str(tmp_path / "two.safetensors"))
    assert main(["attribute", str(run_dir), "estimator=tracin", "n=6", "--test", "test"]) == 0
    got = load_file(str(run_dir / "attribution" / "tracin" / "scores.safetensors"))["scores"]
    assert got.shape == (6, len(te.y))
    assert main(["attribute", str(run_dir), "estimator=tracin", "n=6", "--test", str(tmp_path / "two.safetensors")]
                ) == 0
    two = load_file(str(run_dir / "attribution" / "tracin" / "scores.safetensors"))["scores"]
    assert torch.allclose(two, got[:, :2], rtol=1e-6, atol=0)

    def loss(rec, model, t):  # by hand: the recipe's standardisation and class-weighted per-example loss
        x = (te.x[t:t + 1] - rec.mean) / rec.std
        return torch.nn.functional.cross_entropy(model(x), te.y[t:t + 1], weight=rec.weight, reduction="none")[0]
    from plait.checkpoint import Checkpointer

    model = recipe.model
    params = list(model.parameters())
    ref = torch.zeros(6, 2, dtype=torch.float64)
    for path in Checkpointer(run_dir / "checkpoints").complete():
        step, state = Checkpointer.load(path)
        model.load_state_dict(state["task"]["model"])
        model.eval()
        eta = recipe.step.lr_at(step + 1)
        gt = [torch.autograd.grad(loss(recipe, model, t), params, allow_unused=True) for t in range(2)]
        for j in range(6):
            x = (recipe.data.train.x[j:j + 1] - recipe.mean) / recipe.std  # no augmentation when scoring
            lj = torch.nn.functional.cross_entropy(model(x), recipe.data.train.y[j:j + 1], weight=recipe.weight,
                                                   reduction="none")[0]
            gj = torch.autograd.grad(lj, params, allow_unused=True)
            for t in range(2):
                ref[j, t] += eta * sum(float((a.double() * b.double()).sum()) for a, b in zip(gj, gt[t])
                                       if a is not None and b is not None)
    assert torch.allclose(two, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))  # fp32 model and sums
    # editing on the image run: the two most harmful for the two test images, retrained, against one random pair
    assert main(["attribute", str(run_dir), "estimator=tracin", "n=6", "--test", str(tmp_path / "two.safetensors"),
                 "--remove", "2", "--random-draws", "1"]) == 0
    edit = json.loads((run_dir / "attribution" / "edit.json").read_text())
    assert edit["harmful"]["removed"] == torch.argsort(-two.mean(1), descending=True)[:2].tolist()
    assert len(edit["random"]) == 1 and "eval/accuracy" in edit["harmful"]["delta_eval"]
    assert set(edit["harmful"]) >= {"target_loss", "delta_target_loss", "final_eval"}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def test_retrain_equals_the_config_run_by_hand_without_the_rows(tmp_path, fresh_host):
    from plait.checkpoint import Checkpointer
    from plait.plugins.sam_if.apps import retrain

    fresh_host()
    words = ["red", "blue", "green", "cold", "warm", "dark", "soft", "loud", "calm", "fast"]
    rows = [(f"the {w} one is", " good" if i % 2 else " bad") for i, w in enumerate(words)]
    full = _jsonl(tmp_path / "train.jsonl", rows)
    ev = _jsonl(tmp_path / "eval.jsonl", rows[:2])
    # a grad_transform (sam) and a parallel section: the replay must use both
    extra = "grad_transform: {name: sam, rho: 0.05}\nparallel: {name: single}"
    run_dir = _run(tmp_path, "r", data=f"{{name: jsonl, path: {full}, eval_path: {ev}}}", extra=extra)
    _, cfg, comps, host = rebuilt(run_dir)
    _, final = Checkpointer.load(Checkpointer(run_dir / "checkpoints").latest())
    same = retrain(run_dir, cfg, comps, host, [])
    for k, v in final["task"]["model"].items():  # nothing removed: the run itself, bit for bit
        assert torch.equal(same["state"][k], v), k
    assert [type(m).__name__ for m in same["recipe"].step.transform] == ["SAMTransform"]
    removed = [1, 6]
    got = retrain(run_dir, cfg, comps, host, removed)
    kept = _jsonl(tmp_path / "kept.jsonl", [r for i, r in enumerate(rows) if i not in removed])
    by_hand = _run(tmp_path, "h", data=f"{{name: jsonl, path: {kept}, eval_path: {ev}}}", extra=extra)
    _, hand = Checkpointer.load(Checkpointer(by_hand / "checkpoints").latest())
    assert got["n_kept"] == 8
    for k, v in hand["task"]["model"].items():
        assert torch.equal(got["state"][k], v), k
    assert any(not torch.equal(got["state"][k], v) for k, v in final["task"]["model"].items())


@pytest.mark.slow
def test_removing_the_harmful_duplicates_beats_random_removal(tmp_path, fresh_host):
    fresh_host()
    words = ["red", "blue", "green", "cold", "warm", "dark", "soft", "loud", "calm", "fast", "slow", "wide"]
    # by construction every other example helps the target (the same completion after a similar prompt) and
    # only the copies of the target prompt with the wrong completion hurt it
    rows = [(f"the {w} one is", " good") for w in words]
    bad = [6, 9, 13, 15]
    for j in bad:
        rows.insert(j, ("the gold one is", " bad"))
    train = _jsonl(tmp_path / "train.jsonl", rows)
    ev = _jsonl(tmp_path / "eval.jsonl", rows[:2])
    target = _jsonl(tmp_path / "target.jsonl", [("the gold one is", " good")])
    run_dir = _run(tmp_path, "e", data=f"{{name: jsonl, path: {train}, eval_path: {ev}}}", steps=20, lr=0.05, momentum=0.0, ckpt=5)
    assert main(["attribute", str(run_dir), "estimator=tracin", "--test", str(target), "--remove", "4",
                 "--random-draws", "2"]) == 0
    edit = json.loads((run_dir / "attribution" / "edit.json").read_text())
    assert sorted(edit["harmful"]["removed"]) == bad
    h = edit["harmful"]["delta_target_loss"]
    assert h < 0 and all(h < r["delta_target_loss"] for r in edit["random"]), edit
    assert "## Editing" in (run_dir / "attribution" / "tracin" / "report.md").read_text()


def test_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys):
    fresh_host()
    run_dir = _run(tmp_path, "b")
    for args, match in [(["estimator=tracin", "--test", "nothing"], "names no split"),
                        (["estimator=tracin", "--test", str(tmp_path / "missing.jsonl")], "names no split"),
                        (["estimator=tracin", "--remove", "12"], "K must be in 1..11"),
                        (["estimator=if", "--remove", "3"], "reads sam_train runs only")]:
        capsys.readouterr()
        assert main(["attribute", str(run_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (args, err)
    empty = tmp_path / "no_ckpt"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["attribute", str(empty), "estimator=tracin", "--test", "eval", "--remove", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no complete checkpoint" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, match", [("influence: {name: tracin, against: train}", "influence.against")])
def test_section_against_refusal(tmp_path, fresh_host, capsys, extra, match):
    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(RUN.format(out=tmp_path / "o", data=SENTIMENT, extra=extra, steps=3, lr=1e-2, momentum=0.9, ckpt=1))
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "allowed: self, eval" in err and len(err.splitlines()) == 1


def test_private_run_is_retrained_with_its_dp_transform(tmp_path, fresh_host):
    from plait.plugins.sam_if.apps import retrain

    fresh_host()
    dp = "grad_transform: {name: flashdp, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"
    run_dir = _run(tmp_path, "p", extra=dp)
    _, cfg, comps, host = rebuilt(run_dir)
    r = retrain(run_dir, cfg, comps, host, [0, 5])
    (member,) = list(r["recipe"].step.transform)
    assert type(member).__name__ == "FlashDP" and member.n == 10 and member.sigma == 0.5  # 12 - 2 rows
    assert r["recipe"].step.sum_loss  # per-sample clipped sums + noise: the private step


def test_sft_run_large_damping_limit_is_the_gradient_dot_product(tmp_path, fresh_host, capsys):
    from safetensors.torch import load_file

    from plait.checkpoint import Checkpointer
    from plait.plugins.basics.data import collate
    from plait.plugins.basics.sft_recipe import sample_losses

    fresh_host()
    run_dir = _run(tmp_path, "k")
    lam = 1e8
    layer = "model.decoder.layers.1.fc2"
    assert main(["attribute", str(run_dir), "estimator=ekfac", f"params=[{layer}]", f"damping={lam}",
                 "--test", "eval"]) == 0
    got = load_file(str(run_dir / "attribution" / "ekfac" / "scores.safetensors"))["scores"]
    recipe, *_ = rebuilt(run_dir)
    model = recipe.model
    _, state = Checkpointer.load(Checkpointer(run_dir / "checkpoints").latest())
    model.load_state_dict(state["task"]["model"])
    model.eval()
    fc2 = model.get_submodule(layer)

    def g(loss):
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, [fc2.weight, fc2.bias])])
    gtr = torch.stack([g(recipe.sample_losses([j])[0]) for j in range(12)])
    gte = torch.stack([g(sample_losses(model, collate([recipe.eval_items[t]], recipe.tokenizer.pad_token_id))[0])
                       for t in range(3)])
    ref = gtr @ gte.T
    assert got.shape == (12, 3)
    assert torch.allclose(lam * got, ref, rtol=1e-5, atol=1e-9 * float(ref.abs().max()))
    capsys.readouterr()
    for opts, match in [(["params=[nothing]"], "match no Linear module"), (["k=4"], "no option 'k'")]:
        assert main(["attribute", str(run_dir), "estimator=ekfac", *opts]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err


def test_mislabel_detection_on_an_lm_run_matches_sklearn(tmp_path, fresh_host, capsys):
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    fresh_host()
    words = ["red", "blue", "green", "cold", "warm", "dark", "soft", "loud", "calm", "fast", "slow", "wide",
             "thin", "pale", "deep", "tall"]
    wrong = [2, 7, 11, 14]
    rows = [(f"the {w} one is", " bad" if i in wrong else " good") for i, w in enumerate(words)]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    ev = _jsonl(tmp_path / "eval.jsonl", rows[:2])
    run_dir = _run(tmp_path, "m", data=f"{{name: jsonl, path: {train}, eval_path: {ev}}}", steps=12, lr=0.05,
                   momentum=0.0, ckpt=4)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert main(["attribute", str(run_dir), "estimator=tracin", "--mislabeled", str(tmp_path / "wrong.json")]) == 0
    att = run_dir / "attribution" / "tracin"
    t = load_file(str(att / "scores.safetensors"))
    m = json.loads((att / "report.json").read_text())["mislabel"]
    mask = [i in wrong for i in range(16)]
    assert m["n_mislabeled"] == 4
    assert m["auc"] == pytest.approx(roc_auc_score(mask, t["self_influence"].numpy()), abs=1e-12)
    assert m["baseline_auc"] == pytest.approx(roc_auc_score(mask, t["train_loss"].numpy()), abs=1e-12)
    top2 = torch.argsort(t["self_influence"], descending=True)[:2].tolist()  # 10 % of 16 rounds to 2
    assert m["recall_at_10pct"] == sum(i in wrong for i in top2) / 4
    assert "## Mislabel detection" in (att / "report.md").read_text()
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("[3, 99]")
    assert main(["attribute", str(run_dir), "estimator=tracin", "--mislabeled", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "outside 0..15" in err and len(err.splitlines()) == 1


def test_sam_train_run_refuses_the_any_run_options(tmp_path, fresh_host, capsys):
    fresh_host()
    cfg = tmp_path / "st.yaml"
    cfg.write_text(f"run: {{name: s, seed: 0, steps: 5, out_dir: {tmp_path / 'runs'}, progress: false, device: cpu}}\n"
                   "recipe: {name: sam_train, rho: 0.05, lr: 0.5, l2: 1.0e-2}\n"
                   "model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: []}\n"
                   "data: {name: digits, n_train: 60, n_test: 20, seed: 0}\n")
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (tmp_path / "runs" / "s").iterdir()
    (tmp_path / "w.json").write_text("[1]")
    for args, match in [(["--test", "train"], "allowed: test"),
                        (["--mislabeled", str(tmp_path / "w.json")], "flip_fraction")]:
        capsys.readouterr()
        assert main(["attribute", str(run_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err


def test_tabular_mlp_section_against_eval_equals_hand_loop(tmp_path, fresh_host):
    """The tiny-MLP case: a sam_train run (float64 tabular MLP) with ``influence: {against: eval}``."""
    from safetensors.torch import load_file

    from plait.checkpoint import Checkpointer

    fresh_host()
    cfg = tmp_path / "mlp.yaml"
    cfg.write_text(f"run: {{name: s, seed: 0, steps: 6, ckpt_every: 2, keep_checkpoints: 0, out_dir: "
                   f"{tmp_path / 'runs'}, progress: false, device: cpu}}\n"
                   "recipe: {name: sam_train, rho: 0.05, lr: 0.5, l2: 1.0e-2}\n"
                   "model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}\n"
                   "data: {name: digits, n_train: 30, n_test: 6, seed: 0}\n"
                   "influence: {name: tracin, against: eval, top: 3}\n")
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (tmp_path / "runs" / "s").iterdir()
    got = load_file(str(run_dir / "attribution" / "scores.safetensors"))["scores"]
    recipe, *_ = rebuilt(run_dir)
    model, tr, te = recipe.model, recipe.data.train, recipe.data.test
    params = list(model.parameters())
    ref = torch.zeros(30, 6, dtype=torch.float64)
    for path in Checkpointer(run_dir / "checkpoints").complete():
        _, state = Checkpointer.load(path)
        model.load_state_dict(state["task"]["model"])

        def g(X, y, i):
            loss = torch.nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1])
            return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        G = torch.stack([g(tr.X, tr.y, j) for j in range(30)])
        T = torch.stack([g(te.X, te.y, t) for t in range(6)])
        ref += 0.5 * 2 * (G @ T.T)  # constant lr 0.5, two steps per checkpoint interval
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
