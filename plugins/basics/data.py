"""Text datasets for the basics plugins, and the tokenize/collate helpers.

A dataset exposes ``examples(split)`` for split in ``("train", "eval")``;
each example is a dict with ``prompt: str`` and ``completion: str`` (and, for
classification datasets, ``label: int``).  A classification dataset also
exposes ``label_words``: the completion for each class, with a leading space
(e.g. ``[" terrible", " great"]``), so that an evaluator can score every class
word after the prompt and take the best one.  Other datasets have
``label_words = None``.

Two datasets live here:

* ``SyntheticSentiment``: templated movie-review sentences whose sentiment is
  fixed by the sentiment words they contain.  It needs no download, and its
  label is a function of the bag of words (there is no negation), so a tiny
  model can learn it to ~100% eval accuracy: a quick end-to-end check that
  training works.
* ``JsonlDataset``: the user's own data, as JSON Lines.

``tokenize_example`` turns one prompt/completion pair into ``input_ids`` and
``labels`` (loss only on the completion), and ``collate`` pads a batch.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "eval")
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


# --------------------------------------------------------------------------
# Synthetic sentiment task
# --------------------------------------------------------------------------

# The sentiment of a sentence is carried only by these words; everything else
# is neutral filler, shared by both classes, so the filler carries no signal.
POSITIVE_ADJECTIVES = [
    "wonderful", "brilliant", "delightful", "superb", "charming",
    "moving", "excellent", "stunning", "fantastic", "beautiful",
    "clever", "joyful", "gripping", "marvelous", "lovely",
    "inspiring", "hilarious", "masterful", "touching", "magnificent",
]
NEGATIVE_ADJECTIVES = [
    "awful", "dreadful", "boring", "dull", "clumsy",
    "tedious", "painful", "horrible", "lifeless", "messy",
    "bland", "forgettable", "pointless", "annoying", "weak",
    "sloppy", "miserable", "shallow", "stale", "disappointing",
]
POSITIVE_VERBS = [
    "loved", "adored", "enjoyed", "admired", "cherished",
    "treasured", "praised", "relished", "savored", "applauded",
]
NEGATIVE_VERBS = [
    "hated", "loathed", "disliked", "despised", "resented",
    "regretted", "mocked", "dreaded", "abandoned", "condemned",
]
NOUNS = [
    "plot", "acting", "soundtrack", "script", "cast",
    "ending", "dialogue", "pacing", "story", "direction",
    "cinematography", "performance", "visuals", "humor", "score",
    "editing", "lead actor", "opening scene", "final act", "costume design",
]
SUBJECTS = [
    "I", "We", "My sister", "My father", "The critic",
    "Everyone in the theater", "My friends", "The audience", "Our group", "The reviewer",
]
FILMS = ["movie", "film", "sequel", "drama", "comedy", "thriller", "documentary", "remake"]
TIMES = ["last night", "on Sunday", "this weekend", "yesterday", "at the festival", "on a rainy evening"]

# Each template has slots {adj} / {adj2} (adjectives of the example's
# polarity), {verb} (a verb of that polarity) and neutral slots.
TEMPLATES = [
    "The {noun} was {adj}.",
    "The {noun} of this {film} was {adj}.",
    "I watched this {film} {time} and the {noun} was {adj}.",
    "{subject} {verb} the {noun}.",
    "{subject} {verb} this {film} {time}.",
    "The {film} was {adj}, and the {noun} was {adj2} too.",
    "Honestly, the {noun} felt {adj} from start to finish.",
    "{subject} said the {noun} was {adj} and {verb} the {noun2}.",
    "The {noun} and the {noun2} of this {film} were {adj} and {adj2}.",
    "{subject} saw the {film} {time}; {subject_lower} found it {adj}.",
]

_POLARITY = {
    1: (POSITIVE_ADJECTIVES, POSITIVE_VERBS),
    0: (NEGATIVE_ADJECTIVES, NEGATIVE_VERBS),
}


def _sentence(rng: random.Random, label: int) -> str:
    adjectives, verbs = _POLARITY[label]
    template = rng.choice(TEMPLATES)
    noun, noun2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(adjectives, 2)
    subject = rng.choice(SUBJECTS)
    return template.format(
        noun=noun, noun2=noun2, adj=adj, adj2=adj2, verb=rng.choice(verbs),
        film=rng.choice(FILMS), time=rng.choice(TIMES), subject=subject,
        # The pronoun that refers back to the subject in the last template.
        subject_lower={"I": "I", "We": "we"}.get(subject, "they"),
    )


class SyntheticSentiment:
    """Templated movie-review sentences labelled positive (1) or negative (0).

    prompt = f"{sentence} It was", completion = " great" (label 1) or
    " terrible" (label 0).  Classes are balanced (within one example when a
    split size is odd), the train and eval sentences are disjoint, and the
    whole dataset is a deterministic function of ``seed``.
    """

    label_words: list[str] = [" terrible", " great"]  # index = label
    prompt_suffix = " It was"

    def __init__(self, n_train: int = 512, n_eval: int = 128, seed: int = 0):
        if n_train < 0 or n_eval < 0:
            raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        self.label_words = list(type(self).label_words)  # per-instance copy
        rng = random.Random(seed)

        # Per class: how many sentences each split needs.  The positive class
        # gets the extra example of an odd split; that keeps both balanced.
        need = {
            label: [n // 2 + (n % 2 if label == 1 else 0) for n in (n_train, n_eval)]
            for label in (0, 1)
        }
        per_split: dict[str, list[dict]] = {"train": [], "eval": []}
        for label in (0, 1):
            total = sum(need[label])
            # A dict (not a set) dedupes in insertion order: deterministic.
            unique: dict[str, None] = {}
            attempts = 0
            while len(unique) < total:
                attempts += 1
                if attempts > 50 * total + 1000:
                    raise ValueError(
                        f"cannot draw {total} distinct sentences for label {label}; "
                        f"ask for fewer examples (n_train={n_train}, n_eval={n_eval})"
                    )
                unique.setdefault(_sentence(rng, label), None)
            sentences = list(unique)
            # Distinct sentences, so slicing gives disjoint train and eval.
            split_at = need[label][0]
            for split, chunk in (("train", sentences[:split_at]), ("eval", sentences[split_at:])):
                per_split[split].extend(self._example(s, label) for s in chunk)
        for split in SPLITS:
            rng.shuffle(per_split[split])  # interleave the classes
        self._examples = per_split

    def _example(self, sentence: str, label: int) -> dict:
        return {
            "prompt": sentence + self.prompt_suffix,
            "completion": self.label_words[label],
            "label": label,
        }

    def examples(self, split: str) -> list[dict]:
        _check_split(split)
        return [dict(e) for e in self._examples[split]]  # copies: callers may mutate

    def sentences(self) -> list[str]:
        """Every sentence of both splits (without the prompt suffix)."""
        n = len(self.prompt_suffix)
        return [e["prompt"][:-n] for split in SPLITS for e in self._examples[split]]


# --------------------------------------------------------------------------
# JSON Lines datasets
# --------------------------------------------------------------------------

_FORMATS_HELP = (
    'each line must be a JSON object, either {"prompt": str, "completion": str} '
    'or {"text": str, "label": int} (the latter needs label_words); '
    "blank lines are skipped and one file may not mix the two forms"
)


class JsonlDataset:
    """Prompt/completion (or text/label) examples read from JSON Lines files.

    Row forms (one per file):

    * ``{"prompt": str, "completion": str}``: used as is.  If ``label_words``
      is given, every completion must be one of them and the example gets
      ``label`` = its index (so the data can be scored as classification).
    * ``{"text": str, "label": int}``: prompt = text, completion =
      ``label_words[label]``; ``label_words`` is required.

    Extra keys are ignored.  With ``eval_path`` None, ``eval_fraction`` of the
    rows (at least one when the fraction is > 0 and there are >= 2 rows) are
    held out for eval, chosen by ``seed``; both splits keep file order.
    """

    def __init__(
        self,
        path: str,
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        label_words: list[str] | None = None,
        seed: int = 0,
    ):
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if label_words is not None:
            label_words = list(label_words)
            if not label_words or not all(isinstance(w, str) for w in label_words):
                raise ValueError(f"label_words must be a non-empty list of strings, got {label_words!r}")
        self.path, self.eval_path, self.seed = str(path), eval_path, seed
        self.label_words = label_words

        train = self._read(Path(path))
        if eval_path is not None:
            self._examples = {"train": train, "eval": self._read(Path(eval_path))}
        else:
            self._examples = self._split(train, eval_fraction, seed)

    def examples(self, split: str) -> list[dict]:
        _check_split(split)
        return [dict(e) for e in self._examples[split]]

    @staticmethod
    def _split(rows: list[dict], fraction: float, seed: int) -> dict[str, list[dict]]:
        n = len(rows)
        n_eval = int(round(n * fraction))
        if fraction > 0 and n >= 2:
            n_eval = min(max(n_eval, 1), n - 1)  # both splits non-empty
        order = list(range(n))
        random.Random(seed).shuffle(order)
        eval_idx = set(order[:n_eval])
        return {
            "train": [r for i, r in enumerate(rows) if i not in eval_idx],
            "eval": [r for i, r in enumerate(rows) if i in eval_idx],
        }

    def _read(self, path: Path) -> list[dict]:
        if not path.is_file():
            raise FileNotFoundError(f"JSONL dataset file not found: {path}")
        rows: list[dict] = []
        form: str | None = None  # "prompt" or "text", fixed by the first row
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue

                def fail(what: str) -> ValueError:
                    return ValueError(f"{path}, line {lineno}: {what}; {_FORMATS_HELP}")

                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise fail(f"invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise fail(f"expected a JSON object, got {type(row).__name__}")

                if "prompt" in row or "completion" in row:
                    row_form, keys = "prompt", ("prompt", "completion")
                elif "text" in row or "label" in row:
                    row_form, keys = "text", ("text", "label")
                else:
                    raise fail(f"missing keys: found {sorted(row)}")
                missing = [k for k in keys if k not in row]
                if missing:
                    raise fail(f"missing key(s) {missing} (found {sorted(row)})")
                if form is None:
                    form = row_form
                elif row_form != form:
                    raise fail(
                        f"mixed formats: this row is {row_form}-form but earlier rows are {form}-form"
                    )
                rows.append(self._example(row, row_form, fail))
        if not rows:
            raise ValueError(f"{path}: no examples (the file is empty); {_FORMATS_HELP}")
        return rows

    def _example(self, row: dict, form: str, fail) -> dict:
        words = self.label_words
        if form == "prompt":
            prompt, completion = row["prompt"], row["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise fail("'prompt' and 'completion' must be strings")
            example = {"prompt": prompt, "completion": completion}
            if words is not None:
                if completion not in words:
                    raise fail(
                        f"completion {completion!r} is not one of label_words {words!r} "
                        "(with label_words set, every completion must be a label word)"
                    )
                example["label"] = words.index(completion)
            return example

        text, label = row["text"], row["label"]
        if not isinstance(text, str):
            raise fail("'text' must be a string")
        if words is None:
            raise fail("text/label rows need label_words (the completion for each label)")
        # bool is an int subclass, but true/false as a label is surely a mistake.
        if not isinstance(label, int) or isinstance(label, bool):
            raise fail(f"'label' must be an integer index into label_words, got {label!r}")
        if not 0 <= label < len(words):
            raise fail(f"label {label} out of range: allowed 0..{len(words) - 1} for label_words {words!r}")
        return {"prompt": text, "completion": words[label], "label": label}


# --------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------

def tokenize_example(tokenizer: Any, prompt: str, completion: str, max_length: int) -> dict:
    """Token ids for bos + prompt + completion + eos, and the loss labels.

    ``labels`` is IGNORE_INDEX (-100) on bos and prompt positions and equals
    the token id on completion and eos positions, so the loss trains only the
    completion.  Prompt and completion are tokenized separately so that the
    boundary between them is exact.  If the sequence is longer than
    ``max_length``, tokens are dropped from the left of the prompt (the end of
    the prompt, next to the completion, matters most); if even the completion
    does not fit, the prompt is dropped entirely and the completion (+ eos) is
    cut on the right.  A tokenizer without a bos (or eos) token gets none.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos

    room_for_prompt = max_length - len(bos) - len(target_ids)
    if room_for_prompt >= 0:
        prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), room_for_prompt):]
    else:
        prompt_ids, target_ids = [], target_ids[: max_length - len(bos)]

    context = bos + prompt_ids
    return {
        "input_ids": context + target_ids,
        "labels": [IGNORE_INDEX] * len(context) + list(target_ids),
    }


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` on the right to the longest in the batch.

    Returns int64 tensors ``input_ids`` (padded with ``pad_id``),
    ``attention_mask`` (1 on real tokens) and ``labels`` (padded with -100).
    Other keys of the examples are not passed on, so the result can go
    straight into ``model(**batch)``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)

    def padded(rows: Iterable, value: int) -> torch.Tensor:
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    ids = [list(map(int, ex["input_ids"])) for ex in batch]
    labels = [list(map(int, ex["labels"])) for ex in batch]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if len(a) != len(b):
            raise ValueError(f"example {i}: input_ids has {len(a)} tokens but labels has {len(b)}")
    return {
        "input_ids": padded(ids, pad_id),
        "attention_mask": padded([[1] * len(a) for a in ids], 0),
        "labels": padded(labels, IGNORE_INDEX),
    }
