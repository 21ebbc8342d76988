"""Apps of ``plait attribute`` on any first-order run (sft, classify, composed SAM / DP runs): train × test
scores against a named test set, and data editing by retraining from the run's own config.

* `test_set(recipe, spec)` — the examples ``--test SPEC`` names and a per-example loss for each: ``eval`` (the
  run's eval split: an LM run's tokenized eval examples, an image / tabular run's ``data.test``), ``train`` (the
  training split itself), or a file: ``*.jsonl`` for LM runs (the ``jsonl`` dataset's rows, tokenized with the
  run's tokenizer) and ``*.safetensors`` for image / tabular runs (tensors ``x`` [n, …] and ``y`` [n]). A test
  example's loss is the recipe's own per-example loss (LM: the mean completion-token loss of `basics.sft_recipe`;
  classify: ``recipe.losses`` on the standardised image, class weight included, no augmentation).
* `retrain(run_dir, cfg, comps, host, remove)` — the run's config rebuilt *with* every section (the same seed,
  steps, ``grad_transform:`` chain — a DP run's replay draws its own noise and stays private — and
  ``parallel:``), its ``data:`` split with the ``remove`` training indices dropped (the later examples move up,
  as if the data had never held them), trained in-process with nothing written; returns the final weights and
  evaluation. The same as ``plait run`` on a dataset file without those examples (tested).
* `mislabel_mask` / `mislabel_report` — mislabel detection: with the mislabelled rows known (``--mislabeled
  FILE`` or the dataset's ``flip_mask``), the ROC-AUC and recall at 10 % of the self-influence ranking against
  the training-loss ranking.
* `edit_run` — remove the K most harmful training examples (with ``--test``: the lowest mean TracIn score over
  the test examples, i.e. the largest predicted drop of the test loss; without: the K most self-influential,
  likely mislabelled, examples) against K random ones, retrain each, and report the change of the run's eval
  metrics and of the target's (the test set's) mean loss against the run's own final weights.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from plait.errors import ConfigError, PlaitError

SPLITS = ("eval", "test", "train")


@dataclasses.dataclass
class TestSet:
    """``n`` examples, ``loss_of(model, i)`` (a scalar), ``describe(i)`` (text or label), ``name``."""

    name: str
    n: int
    loss_of: Any
    describe: Any


def _is_lm(recipe) -> bool:
    return getattr(recipe, "tokenizer", None) is not None and hasattr(recipe, "train_items")


def _lm_set(recipe, name: str, items: list) -> TestSet:
    from plait.plugins.basics.data import collate
    from plait.plugins.basics.sft_recipe import sample_losses

    device = getattr(recipe, "device", torch.device("cpu"))
    tok = recipe.tokenizer

    def loss_of(model, i):
        batch = {k: v.to(device) for k, v in collate([items[i]], tok.pad_token_id).items()}
        return sample_losses(model, batch)[0]

    def describe(i):
        ids = items[i]["input_ids"]
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return tok.decode(ids).replace("\n", " ").replace("|", "/")[:120]
    return TestSet(name, len(items), loss_of, describe)


def _xy_set(recipe, name: str, x: torch.Tensor, y: torch.Tensor) -> TestSet:
    mean, std = getattr(recipe, "mean", None), getattr(recipe, "std", None)
    device = getattr(getattr(recipe, "run", None), "device", torch.device("cpu"))

    def loss_of(model, i):
        xi = x[i:i + 1]
        if mean is not None and std is not None:
            xi = (xi - mean) / std
        xi, yi = xi.to(device), y[i:i + 1].to(device)
        logits = model(xi)
        if hasattr(recipe, "losses"):
            return recipe.losses(logits, yi)[0]
        return torch.nn.functional.cross_entropy(logits, yi, reduction="none")[0]
    return TestSet(name, int(len(y)), loss_of, lambda i: str(int(y[i])))


def test_set(recipe, spec: str) -> TestSet:
    """The examples ``--test SPEC`` names (see the module docstring); ConfigError naming SPEC otherwise."""
    spec = str(spec or "").strip()
    lm = _is_lm(recipe)
    data = getattr(recipe, "data", None)
    if spec in SPLITS:
        if lm:
            items = recipe.train_items if spec == "train" else getattr(recipe, "eval_items", [])
            out = _lm_set(recipe, spec, list(items))
        else:
            split = getattr(data, "train" if spec == "train" else "test", None)
            x, y = getattr(split, "x", None), getattr(split, "y", None)
            x = getattr(split, "X", None) if x is None else x  # tabular splits (sam_train) name it X
            if x is None or y is None:
                raise ConfigError(f"attribute --test {spec}: the run's data {type(data).__name__} has no "
                                  f"{'train' if spec == 'train' else 'test'} split with x / y tensors")
            out = _xy_set(recipe, spec, x, y)
    else:
        path = Path(spec)
        want = ".jsonl" if lm else ".safetensors"
        if not spec or not path.is_file() or path.suffix != want:
            kind = "an LM" if lm else "an image / tabular"
            raise ConfigError(f"attribute --test {spec!r}: names no split and no {want} file; allowed for {kind} "
                              f"run: {', '.join(SPLITS)} or a path to a {want} file"
                              + (" of prompt/completion rows" if lm else " holding tensors x [n, …] and y [n]"))
        if lm:
            from plait.plugins.basics.data import JsonlDataset
            from plait.plugins.basics.parts import tokenize_split

            try:
                rows = JsonlDataset(str(path), eval_fraction=0.0,
                                    label_words=getattr(data, "label_words", None)).examples("train")
            except (ValueError, OSError) as exc:
                raise ConfigError(f"attribute --test {spec!r}: {exc}") from exc
            max_length = int(getattr(getattr(recipe, "cfg", None), "max_length", 128))
            out = _lm_set(recipe, path.name, tokenize_split(recipe.tokenizer, rows, max_length))
        else:
            from safetensors.torch import load_file

            t = load_file(str(path))
            if "x" not in t or "y" not in t or len(t["x"]) != len(t["y"]):
                raise ConfigError(f"attribute --test {spec!r}: needs tensors x [n, …] and y [n] of one length; "
                                  f"found {', '.join(f'{k} {list(v.shape)}' for k, v in t.items()) or 'none'}")
            out = _xy_set(recipe, path.name, t["x"].float(), t["y"].long())
    if out.n == 0:
        raise ConfigError(f"attribute --test {spec!r}: the set is empty; name a split or file with examples")
    return out


# --- retraining without some training examples -------------------------------------------------------------
class _TextSubset:
    """A text dataset whose train split lacks some rows; everything else delegates."""

    def __init__(self, data, keep: list[int]):
        self._data, self._keep = data, keep

    def __getattr__(self, name):
        return getattr(self._data, name)

    def examples(self, split: str) -> list[dict]:
        rows = self._data.examples(split)
        return [rows[i] for i in self._keep] if split == "train" else rows


def _train_rows(data) -> int | None:
    if hasattr(data, "examples"):
        return len(data.examples("train"))
    y = getattr(getattr(data, "train", None), "y", None)
    return None if y is None else len(y)


def subset_data(data, remove) -> Any:
    """``data`` without the ``remove`` rows of its train split (text datasets: ``examples("train")``; image /
    tabular: ``data.train.x`` / ``.y``); PlaitError naming the dataset when it has neither, ConfigError for an
    index outside the split."""
    n = _train_rows(data)
    if n is None:
        raise PlaitError(f"attribute --remove: the run's data {type(data).__name__} has neither examples('train') "
                         f"nor train.x / train.y; its training examples cannot be dropped for retraining")
    drop = {int(i) for i in remove}
    if drop and not (min(drop) >= 0 and max(drop) < n):
        raise ConfigError(f"attribute --remove: indices must be in 0..{n - 1}, got {min(drop)}..{max(drop)}")
    keep = [i for i in range(n) if i not in drop]
    if hasattr(data, "examples"):
        return _TextSubset(data, keep)
    train = data.train
    idx = torch.as_tensor(keep, dtype=torch.long)
    new = copy.copy(train)
    new.x, new.y = train.x[idx], train.y[idx]
    out = copy.copy(data)
    out.train = new
    return out


def retrain(run_dir: Path, cfg, comps, host, remove) -> dict[str, Any]:
    """Train the run's config again with the ``remove`` training indices dropped (see the module docstring).

    Returns ``{"state": final model state_dict, "final_eval": …, "recipe": the trained recipe, "n_kept": …}``;
    nothing is written (no logger, no checkpoints)."""
    from plait.run import (
        Run,
        _NoCheckpoints,
        _NullLogger,
        _quiet_library_progress,
        _start_parallel,
        resolve_device,
        seed_everything,
    )

    kept: list[int] = []

    class _SubsetRun(Run):
        def build(self, section, **runtime):
            built = super().build(section, **runtime)
            if section != "data":
                return built
            sub = subset_data(built, remove)
            kept.append(_train_rows(sub))
            return sub

    _quiet_library_progress()
    parallel = _start_parallel(cfg, comps)
    try:
        run = _SubsetRun(cfg, comps, host, run_dir, resolve_device(cfg.run.device), _NullLogger(),
                         _NoCheckpoints(run_dir / "checkpoints"), parallel=parallel)
        seed_everything(cfg.run.seed)
        recipe = run.build("recipe", run=run)
        result = recipe() or {}
    finally:
        close = getattr(parallel, "close", None)
        if close is not None:
            close()
    model = recipe.step.model if hasattr(recipe, "step") else recipe.model
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "final_eval": dict(result.get("final_eval") or {}), "recipe": recipe, "n_kept": kept[-1] if kept else None}


def _target(recipe, spec: str | None) -> float | None:
    if not spec:
        return None
    ts = test_set(recipe, spec)
    model = recipe.step.model
    model.eval()
    with torch.no_grad():
        return float(torch.stack([ts.loss_of(model, i).detach().double() for i in range(ts.n)]).mean())


def edit_run(run_dir: Path, cfg, comps, host, *, k: int, priority: torch.Tensor, base_recipe,
             test: str | None, draws: int = 1, seed: int = 0) -> dict[str, Any]:
    """Remove the ``k`` training examples of highest ``priority`` (−mean test score, or self-influence) against
    ``k`` random ones (``draws`` sets, ``seed``); retrain each; eval metrics and the target's mean loss (the
    ``test`` set) against the run's final weights (``base_recipe``, checkpoint loaded)."""
    n = int(priority.shape[0])
    if not 0 < k < n:
        raise ConfigError(f"attribute --remove: K must be in 1..{n - 1} (the run has {n} scored training "
                          f"examples), got {k}")
    order = torch.argsort(priority, descending=True, stable=True)
    chosen = [int(j) for j in order[:k]]
    base = {"final_eval": {k2: float(v) for k2, v in (base_recipe.evaluate() or {}).items()
                           if isinstance(v, (int, float))},
            "target_loss": _target(base_recipe, test)}

    def one(rows):
        r = retrain(run_dir, cfg, comps, host, rows)
        ev = {k2: float(v) for k2, v in r["final_eval"].items() if isinstance(v, (int, float))}
        out = {"removed": [int(j) for j in rows], "final_eval": ev, "target_loss": _target(r["recipe"], test)}
        out["delta_eval"] = {k2: ev[k2] - base["final_eval"][k2] for k2 in ev if k2 in base["final_eval"]}
        if out["target_loss"] is not None and base["target_loss"] is not None:
            out["delta_target_loss"] = out["target_loss"] - base["target_loss"]
        return out

    g = torch.Generator().manual_seed(int(seed))
    rand = [one(torch.randperm(n, generator=g)[:k].tolist()) for _ in range(max(1, int(draws)))]
    report = {"k": k, "ranking": "test" if test else "self_influence", "test": test, "base": base,
              "harmful": one(chosen), "random": rand,
              "retraining": "the run's config with every section (seed, steps, grad_transform, parallel), the "
                            "removed training examples dropped from its data"}
    if test:
        report["random_mean_delta_target_loss"] = sum(r["delta_target_loss"] for r in rand) / len(rand)
    return report


# --- mislabel detection ------------------------------------------------------------------------------------
def mislabel_mask(recipe, n: int, path: str | None) -> torch.Tensor | None:
    """Which of the first ``n`` training examples are known to be mislabelled: ``path`` (a JSON list of indices,
    or one index per line), else the dataset's own ``flip_mask`` (datasets with a label-flip option); None when
    neither says."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"attribute --mislabeled {path!r}: no such file; give a JSON list of training indices "
                              f"or one index per line")
        text = p.read_text().strip()
        try:
            idx = json.loads(text) if text.startswith("[") else [int(x) for x in text.split()]
            idx = [int(i) for i in idx]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"attribute --mislabeled {path!r}: not a list of integers ({exc})") from exc
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ConfigError(f"attribute --mislabeled {path!r}: indices {bad[:5]} outside 0..{n - 1}")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.as_tensor(idx, dtype=torch.long)] = True
        return mask
    flip = getattr(getattr(recipe, "data", None), "flip_mask", None)
    if flip is None:
        return None
    return torch.as_tensor(flip, dtype=torch.bool)[:n]


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC of ranking ``positive`` first by ``score``: P(score_pos > score_neg) + ½ P(tie)."""
    pos, neg = score[positive].double(), score[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def recall_at(score: torch.Tensor, positive: torch.Tensor, fraction: float = 0.1) -> float:
    k = max(1, int(round(fraction * len(score))))
    top = torch.argsort(score, descending=True, stable=True)[:k]
    return float(positive[top].sum()) / max(1, int(positive.sum()))


def mislabel_report(self_inf: torch.Tensor, train_loss: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Self-influence vs training-loss ranking of the known mislabelled rows: ROC-AUC and recall at 10 %."""
    return {"n_mislabeled": int(mask.sum()), "auc": auc(self_inf, mask), "recall_at_10pct": recall_at(self_inf, mask),
            "baseline": "training loss at the last checkpoint", "baseline_auc": auc(train_loss, mask),
            "baseline_recall_at_10pct": recall_at(train_loss, mask)}
