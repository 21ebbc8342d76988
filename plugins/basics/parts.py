"""Pieces every language-model recipe builds the same way: the model (with the ``transforms:`` list applied)
and the tokenized train/eval splits of the ``data:`` section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plait.errors import ConfigError

from .data import tokenize_example


def check_positive(options: Any, keys: tuple[str, ...], section: str = "recipe") -> None:
    """Counts (sizes, lengths): 0 or less means nothing."""
    for key in keys:
        if getattr(options, key) < 1:
            raise ConfigError(f"{section}.{key}: must be at least 1, got {getattr(options, key)}")


def check_non_negative(options: Any, keys: tuple[str, ...], section: str = "recipe") -> None:
    """Options whose 0 means "off" (warm-up, clipping, decay): a negative value would slip past those tests and
    change the run silently (a skewed schedule, clipping turned off), so it is refused."""
    for key in keys:
        if getattr(options, key) < 0:
            raise ConfigError(f"{section}.{key}: must be 0 or more, got {getattr(options, key)}")


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
    """The ``data:`` section's splits, tokenized; ``eval_limit`` (``recipe.eval_examples``) > 0 keeps the first N
    eval examples, 0 all of them. A negative limit is refused: as a slice it would drop the last examples."""
    if eval_limit < 0:
        raise ConfigError(f"recipe.eval_examples: must be 0 (the whole eval split) or more, got {eval_limit}")
    data = run.build("data")
    train_items = tokenize_split(tokenizer, data.examples("train"), max_length)
    eval_examples = data.examples("eval")
    if eval_limit:
        eval_examples = eval_examples[:eval_limit]
    return TextSplits(data, train_items, eval_examples, tokenize_split(tokenizer, eval_examples, max_length))
