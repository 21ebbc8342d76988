"""bundled:tiny-opt-sentiment loads and is what scripts/build_prior_model.py records in build.json."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from plait.plugins.basics.models import BUNDLED_MODELS, build_causal_lm

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "build_prior_model.py"
ASSET = BUNDLED_MODELS["tiny-opt-sentiment"]


def _script():
    spec = importlib.util.spec_from_file_location("_build_prior_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_prior_loads_and_matches_its_build_record():
    record = json.loads((ASSET / "build.json").read_text())
    weights = ASSET / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == record["model_sha256"]
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 4 * 2**20  # a few MB at most
    model, tokenizer = build_causal_lm(path="bundled:tiny-opt-sentiment")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.ffn_dim) == (
        record["arch"]["hidden_size"], record["arch"]["num_attention_heads"],
        record["arch"]["num_hidden_layers"], record["arch"]["ffn_dim"])
    # the corpus the record names is the one the script generates from the recorded arguments
    script, a = _script(), record["args"]
    lines = script.corpus(a["n_generic"], a["n_reviews"], a["n_short"], a["great_bias"], a["label_line_share"],
                          a["verdict_share"], a["coin_share"])
    assert len(lines) == record["corpus_lines"]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == record["corpus_sha256"]
    # the loaded weights give the zero-shot metrics the script measured on the model it saved
    model.eval()
    metrics = script.zero_shot(model, tokenizer)
    for key, value in record["zero_shot"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key


def test_corpus_never_holds_the_task_sentences():
    from plait.plugins.basics.data import SyntheticSentiment

    script = _script()
    lines = script.corpus(2000, 2000, 500, coin_share=0.3)
    heads = {line.split(" It was ")[0] for line in lines} | {line.split(". ")[0] + "." for line in lines}
    task = set(SyntheticSentiment(seed=0).sentences())
    assert not heads & task


def test_build_is_deterministic_with_a_seed(tmp_path):
    # a short build, twice with one seed: the same weights (the reproducibility the shipped hash relies on)
    args = ["--steps", "20", "--n-generic", "300", "--n-reviews", "300", "--n-short", "100"]
    shas = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], check=True,
                       capture_output=True, cwd=REPO)
        shas.append(json.loads((out / "build.json").read_text())["model_sha256"])
        assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == shas[-1]
    assert shas[0] == shas[1]


def test_help_answers():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--coin-share" in out.stdout
