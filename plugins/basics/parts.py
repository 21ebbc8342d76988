"""Pieces every language-model recipe builds the same way: the model (with the ``transforms:`` list applied)
and the tokenized train/eval splits of the ``data:`` section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.errors import ConfigError

from .data import tokenize_example


def check_positive(options: Any, keys: tuple[str, ...], section: str = "recipe") -> None:
    for key in keys:
        if getattr(options, key) < 1:
            raise ConfigError(f"{section}.{key}: must be at least 1, got {getattr(options, key)}")


def build_lm(run) -> tuple[Any, Any]:
    """(model, tokenizer) from the ``model:`` section, the ``transforms:`` applied in order."""
    bundle = run.build("model")
    model = bundle.model
    for transform in run.build_transforms():
        model = transform(model)
    return model, bundle.tokenizer


def tokenize_split(tokenizer, examples: list[dict], max_length: int) -> list[dict]:
    return [tokenize_example(tokenizer, e["prompt"], e["completion"], max_length) for e in examples]


@dataclass
class TextSplits:
    data: Any  # the dataset object (``label_words`` for classification tasks)
    train_items: list[dict]  # tokenized train examples
    eval_examples: list[dict]  # raw eval examples (prompt, completion, label)
    eval_items: list[dict]  # tokenized eval examples


def load_text_splits(run, tokenizer, max_length: int, eval_limit: int = 0) -> TextSplits:
    """The ``data:`` section's splits, tokenized; ``eval_limit`` > 0 keeps the first N eval examples."""
    data = run.build("data")
    train_items = tokenize_split(tokenizer, data.examples("train"), max_length)
    eval_examples = data.examples("eval")
    if eval_limit:
        eval_examples = eval_examples[:eval_limit]
    return TextSplits(data, train_items, eval_examples, tokenize_split(tokenizer, eval_examples, max_length))
