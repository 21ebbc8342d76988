"""Tests of the bundled tokenizer and ``load_tokenizer``."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from plait.plugins.basics import tokenizer as tokmod
from plait.plugins.basics.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[3]
TEXTS = [
    "The plot was wonderful. It was great",
    "Alice bought 3 red books in 2024, because Bob asked!",
    "  leading and   repeated spaces\tand a tab\nand a newline",
    "Unicode: café, naïve, 東京, emoji 🙂",
    "",
]


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection, and tell HF it is offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_bundled_asset_is_small_and_loads_offline(no_network):
    asset = Path(tokmod.__file__).parent / "assets" / "tokenizer.json"
    assert asset.is_file()
    assert asset.stat().st_size < 200 * 1024
    tok = load_tokenizer()
    assert len(tok) == 1024


def test_special_token_ids(no_network):
    tok = load_tokenizer()
    # The ids the build script promises (and models' pad/bos/eos ids rely on).
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 3)
    assert tok.padding_side == "right"
    # The raw tokenizers file agrees (independent of transformers' view).
    raw = json.loads((Path(tokmod.__file__).parent / "assets" / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in raw["added_tokens"]}
    assert added == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(no_network, text):
    tok = load_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Byte-level BPE: every byte is in the vocabulary, so nothing maps to <unk>.
    assert tok.unk_token_id not in ids


def test_no_special_tokens_added_automatically():
    tok = load_tokenizer()
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]


def test_label_words_are_single_tokens():
    # Scoring " great" vs " terrible" is cleanest when each is one token.
    tok = load_tokenizer()
    for word in (" great", " terrible"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_padding_is_on_the_right():
    tok = load_tokenizer()
    batch = tok(["a", "a b c d"], padding=True, add_special_tokens=False)
    short, long_ = batch["input_ids"]
    assert len(short) == len(long_)
    assert short[-1] == tok.pad_token_id and short[0] != tok.pad_token_id
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


def test_load_from_directory_and_json_file(no_network, tmp_path):
    tok = load_tokenizer()
    tok.save_pretrained(tmp_path / "saved")
    from_dir = load_tokenizer(str(tmp_path / "saved"))
    from_json = load_tokenizer(str(Path(tokmod.__file__).parent / "assets" / "tokenizer.json"))
    for other in (from_dir, from_json):
        assert len(other) == len(tok)
        assert (other.pad_token_id, other.bos_token_id, other.eos_token_id) == (0, 1, 2)
        assert other.padding_side == "right"
        for text in TEXTS:
            assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_directory_without_pad_token_gets_eos_as_pad(tmp_path):
    # A GPT-2/LLaMA-style tokenizer without a pad token: padding must still work.
    tok = load_tokenizer()
    raw = json.loads((Path(tokmod.__file__).parent / "assets" / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<pad>"]
    raw["model"]["vocab"].pop("<pad>")
    path = tmp_path / "nopad.json"
    path.write_text(json.dumps(raw))
    other = load_tokenizer(path)
    assert other.pad_token == "</s>" and other.pad_token_id == tok.eos_token_id


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(str(missing))


def test_other_file_type_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(path)


@pytest.mark.slow
def test_asset_matches_build_script():
    """The bundled asset is what scripts/build_tokenizer.py produces (it is deterministic)."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO / "scripts" / "build_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    built = script.build().to_str(pretty=False) + "\n"
    asset = (Path(tokmod.__file__).parent / "assets" / "tokenizer.json").read_text(encoding="utf-8")
    assert built == asset, "the tokenizer asset is stale: run scripts/build_tokenizer.py"
