"""Tests of the datasets, ``tokenize_example`` and ``collate``."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from plait.plugins.basics.data import JsonlDataset, SyntheticSentiment, collate, tokenize_example
from plait.plugins.basics.tokenizer import load_tokenizer

# --------------------------------------------------------------------------
# SyntheticSentiment
# --------------------------------------------------------------------------

def test_synthetic_defaults_and_shape():
    ds = SyntheticSentiment()
    assert ds.label_words == [" terrible", " great"]
    train, eval_ = ds.examples("train"), ds.examples("eval")
    assert (len(train), len(eval_)) == (512, 128)
    for e in train + eval_:
        assert set(e) == {"prompt", "completion", "label"}
        assert e["prompt"].endswith(". It was") or e["prompt"].endswith(" It was")
        assert e["completion"] == ds.label_words[e["label"]]


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = SyntheticSentiment(seed=0), SyntheticSentiment(seed=0), SyntheticSentiment(seed=1)
    for split in ("train", "eval"):
        assert a.examples(split) == b.examples(split)
        assert a.examples(split) != c.examples(split)


@pytest.mark.parametrize("n_train,n_eval", [(512, 128), (101, 33), (2, 1), (0, 4)])
def test_synthetic_balanced_and_disjoint(n_train, n_eval):
    ds = SyntheticSentiment(n_train=n_train, n_eval=n_eval, seed=3)
    train, eval_ = ds.examples("train"), ds.examples("eval")
    for split, n in ((train, n_train), (eval_, n_eval)):
        counts = Counter(e["label"] for e in split)
        assert len(split) == n
        assert abs(counts[0] - counts[1]) <= 1
    train_prompts = [e["prompt"] for e in train]
    eval_prompts = [e["prompt"] for e in eval_]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)


def test_synthetic_examples_are_copies():
    ds = SyntheticSentiment(n_train=4, n_eval=2)
    ds.examples("train")[0]["prompt"] = "changed"
    assert ds.examples("train")[0]["prompt"] != "changed"


def test_unknown_split():
    with pytest.raises(ValueError, match="test"):
        SyntheticSentiment(n_train=2, n_eval=2).examples("test")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_bag_of_words_logistic_regression_learns_the_label():
    """Independent check that the label is a function of the text: a linear
    bag-of-words classifier trained on the train split gets ~100% on eval."""
    ds = SyntheticSentiment(seed=0)
    train, eval_ = ds.examples("train"), ds.examples("eval")
    vocab = {w: i for i, w in enumerate(sorted({w for e in train for w in _words(e["prompt"])}))}

    def features(examples):
        x = torch.zeros(len(examples), len(vocab))
        for row, e in enumerate(examples):
            for w in _words(e["prompt"]):
                if w in vocab:  # eval words never seen in training carry no weight
                    x[row, vocab[w]] = 1.0
        return x, torch.tensor([e["label"] for e in examples], dtype=torch.float32)

    x_train, y_train = features(train)
    x_eval, y_eval = features(eval_)

    def eval_accuracy(targets: torch.Tensor) -> float:
        torch.manual_seed(0)
        linear = torch.nn.Linear(len(vocab), 1)
        opt = torch.optim.Adam(linear.parameters(), lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x_train).squeeze(1), targets)
            loss.backward()
            opt.step()
        return ((linear(x_eval).squeeze(1) > 0).float() == y_eval).float().mean().item()

    assert eval_accuracy(y_train) >= 0.95
    # Control: the same classifier trained on shuffled labels is near chance,
    # so the check above measures the data, not a leak in the procedure.
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))]
    assert eval_accuracy(shuffled) < 0.75


def test_filler_words_carry_no_signal():
    # The prompt suffix and filler appear in both classes: no single word
    # other than sentiment words is exclusive to one class in a big sample.
    from plait.plugins.basics import data

    ds = SyntheticSentiment(n_train=2000, n_eval=0, seed=0)
    by_label = {0: Counter(), 1: Counter()}
    for e in ds.examples("train"):
        by_label[e["label"]].update(set(_words(e["prompt"])))
    sentiment = set(data.POSITIVE_ADJECTIVES + data.NEGATIVE_ADJECTIVES + data.POSITIVE_VERBS + data.NEGATIVE_VERBS)
    exclusive = (set(by_label[0]) ^ set(by_label[1])) - sentiment
    assert not exclusive


# --------------------------------------------------------------------------
# JsonlDataset
# --------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_prompt_completion_with_eval_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", [json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) for i in range(5)])
    evalf = _write(tmp_path / "eval.jsonl", ["", json.dumps({"prompt": "qe", "completion": " ae", "extra": 1}), "  "])
    ds = JsonlDataset(str(train), eval_path=str(evalf))
    assert ds.label_words is None
    assert ds.examples("train") == [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(5)]
    assert ds.examples("eval") == [{"prompt": "qe", "completion": " ae"}]


def test_jsonl_text_label(tmp_path):
    rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}]
    path = _write(tmp_path / "cls.jsonl", [json.dumps(r) for r in rows])
    ds = JsonlDataset(str(path), eval_fraction=0.0, label_words=[" terrible", " great"])
    assert ds.label_words == [" terrible", " great"]
    assert ds.examples("train") == [
        {"prompt": "good film", "completion": " great", "label": 1},
        {"prompt": "bad film", "completion": " terrible", "label": 0},
    ]
    assert ds.examples("eval") == []


def test_jsonl_prompt_completion_with_label_words_gets_labels(tmp_path):
    path = _write(tmp_path / "pc.jsonl", [json.dumps({"prompt": "x", "completion": " great"})])
    ds = JsonlDataset(str(path), eval_fraction=0.0, label_words=[" terrible", " great"])
    assert ds.examples("train") == [{"prompt": "x", "completion": " great", "label": 1}]


def test_jsonl_fraction_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": str(i), "completion": "c"}) for i in range(50)])
    a = JsonlDataset(str(path), eval_fraction=0.2, seed=7)
    b = JsonlDataset(str(path), eval_fraction=0.2, seed=7)
    c = JsonlDataset(str(path), eval_fraction=0.2, seed=8)
    ids = lambda ds, split: [int(e["prompt"]) for e in ds.examples(split)]  # noqa: E731
    assert len(ids(a, "eval")) == 10 and len(ids(a, "train")) == 40
    assert sorted(ids(a, "train") + ids(a, "eval")) == list(range(50))
    assert ids(a, "train") == sorted(ids(a, "train"))  # file order kept
    assert ids(a, "eval") == ids(b, "eval")
    assert ids(a, "eval") != ids(c, "eval")


def test_jsonl_small_file_keeps_both_splits_non_empty(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "completion": "c"})] * 3)
    ds = JsonlDataset(str(path), eval_fraction=0.1)
    assert (len(ds.examples("train")), len(ds.examples("eval"))) == (2, 1)


BAD_CASES = [
    # (lines, label_words, line number of the error, fragment of the message)
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], None, 2, "invalid JSON"),
    (['[1, 2]'], None, 1, "JSON object"),
    (['{"prompt": "a"}'], None, 1, "missing key"),
    (['{"foo": 1}'], None, 1, "missing key"),
    (['{"text": "a"}'], [" x"], 1, "missing key"),
    (['{"prompt": "a", "completion": 3}'], None, 1, "must be strings"),
    (['{"text": "a", "label": 2}'], [" no", " yes"], 1, "out of range"),
    (['{"text": "a", "label": -1}'], [" no", " yes"], 1, "out of range"),
    (['{"text": "a", "label": "1"}'], [" no", " yes"], 1, "integer"),
    (['{"text": "a", "label": true}'], [" no", " yes"], 1, "integer"),
    (['{"text": "a", "label": 0}'], None, 1, "label_words"),
    (['{"prompt": "a", "completion": " b"}', '', '{"text": "a", "label": 0}'], [" b"], 3, "mixed formats"),
    (['{"prompt": "a", "completion": " maybe"}'], [" no", " yes"], 1, "not one of label_words"),
]


@pytest.mark.parametrize("lines,label_words,lineno,fragment", BAD_CASES)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, label_words, lineno, fragment):
    path = _write(tmp_path / "bad_rows.jsonl", lines)
    with pytest.raises(ValueError) as info:
        JsonlDataset(str(path), label_words=label_words)
    message = str(info.value)
    assert "bad_rows.jsonl" in message
    assert f"line {lineno}" in message
    assert fragment in message
    assert '{"prompt": str, "completion": str}' in message  # says what is allowed


def test_jsonl_errors_in_eval_file_name_the_eval_file(tmp_path):
    train = _write(tmp_path / "train.jsonl", ['{"prompt": "a", "completion": "b"}'])
    evalf = _write(tmp_path / "heldout.jsonl", ['{"prompt": "a", "completion": "b"}', "nope"])
    with pytest.raises(ValueError, match=r"heldout\.jsonl, line 2"):
        JsonlDataset(str(train), eval_path=str(evalf))


def test_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        JsonlDataset(str(tmp_path / "nowhere.jsonl"))
    train = _write(tmp_path / "train.jsonl", ['{"prompt": "a", "completion": "b"}'])
    with pytest.raises(FileNotFoundError, match="missing_eval.jsonl"):
        JsonlDataset(str(train), eval_path=str(tmp_path / "missing_eval.jsonl"))
    empty = _write(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="empty.jsonl.*no examples"):
        JsonlDataset(str(empty))


def test_jsonl_bad_eval_fraction(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}'])
    with pytest.raises(ValueError, match="eval_fraction"):
        JsonlDataset(str(path), eval_fraction=1.0)


# --------------------------------------------------------------------------
# tokenize_example and collate
# --------------------------------------------------------------------------

class CharTokenizer:
    """One token per character, id = ord(char): expected ids can be written by hand."""

    def __init__(self, bos=1, eos=2):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # tokenize_example adds bos/eos itself
        return {"input_ids": [ord(c) for c in text]}


A, B, C, D = ord("a"), ord("b"), ord("c"), ord("d")


def test_tokenize_example_masks_bos_and_prompt():
    out = tokenize_example(CharTokenizer(), "ab", "cd", max_length=16)
    assert out == {
        "input_ids": [1, A, B, C, D, 2],
        "labels": [-100, -100, -100, C, D, 2],
    }


@pytest.mark.parametrize("max_length,input_ids,labels", [
    (6, [1, A, B, C, D, 2], [-100, -100, -100, C, D, 2]),  # fits exactly
    (5, [1, B, C, D, 2], [-100, -100, C, D, 2]),  # prompt cut from the left
    (4, [1, C, D, 2], [-100, C, D, 2]),  # no prompt left
    (3, [1, C, D], [-100, C, D]),  # completion itself cut on the right
])
def test_tokenize_example_truncation(max_length, input_ids, labels):
    out = tokenize_example(CharTokenizer(), "ab", "cd", max_length=max_length)
    assert out == {"input_ids": input_ids, "labels": labels}
    assert len(out["input_ids"]) <= max_length


def test_tokenize_example_without_bos():
    out = tokenize_example(CharTokenizer(bos=None), "a", "c", max_length=8)
    assert out == {"input_ids": [A, C, 2], "labels": [-100, C, 2]}


def test_tokenize_example_rejects_tiny_max_length():
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(CharTokenizer(), "a", "b", max_length=1)


def test_tokenize_example_with_real_tokenizer():
    tok = load_tokenizer()
    prompt, completion = "The plot was wonderful. It was", " great"
    out = tokenize_example(tok, prompt, completion, max_length=64)
    ids, labels = out["input_ids"], out["labels"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == prompt + completion
    trained = [i for i, l in zip(ids, labels) if l != -100]
    assert trained == [l for l in labels if l != -100]  # labels equal ids where not masked
    assert tok.decode(trained) == completion + "</s>"
    assert labels[: len(labels) - len(trained)] == [-100] * (len(labels) - len(trained))


def test_collate_pads_on_the_right():
    batch = [
        {"input_ids": [1, 5, 6], "labels": [-100, 6, 2], "label": 1},
        {"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]},
    ]
    out = collate(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 5, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 2, -100, -100], [-100, -100, 6, 7, 8]]


def test_collate_accepts_tensors_and_rejects_bad_batches():
    out = collate([{"input_ids": torch.tensor([3, 4]), "labels": torch.tensor([-100, 4])}], pad_id=9)
    assert out["input_ids"].tolist() == [[3, 4]]
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)
