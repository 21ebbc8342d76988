"""Evaluation shared by language-model recipes: completion loss and label-word accuracy.

Both take ``forward(input_ids, attention_mask) -> logits``, so any engine (plain module, offloaded ZO engine)
can be evaluated the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .data import collate, tokenize_example

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _token_logprobs(forward: Forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(batch["input_ids"], batch["attention_mask"]).float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


@torch.no_grad()
def completion_loss(forward: Forward, items: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Mean negative log-likelihood per completion token over ``items`` (tokenized examples)."""
    nll, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_id).items()}
        picked, mask = _token_logprobs(forward, batch)
        nll -= float(picked.sum())
        count += int(mask.sum())
    return nll / max(count, 1)


@torch.no_grad()
def completion_logprobs(forward: Forward, tokenizer, prompts: list[str], completions: list[str], max_length: int,
                        batch_size: int, device) -> torch.Tensor:
    """Sum of log p(completion | prompt) per pair (completion tokens and eos), shape [len(prompts)]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        items = [tokenize_example(tokenizer, p, c, max_length)
                 for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        batch = {k: v.to(device) for k, v in collate(items, tokenizer.pad_token_id).items()}
        picked, _ = _token_logprobs(forward, batch)
        out.append(picked.sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def label_word_accuracy(forward: Forward, tokenizer, examples: list[dict], label_words: list[str], max_length: int,
                        batch_size: int, device) -> float:
    """Accuracy of picking the label word with the highest log-likelihood after the prompt (MeZO-style)."""
    prompts = [e["prompt"] for e in examples for _ in label_words]
    completions = [w for _ in examples for w in label_words]
    scores = completion_logprobs(forward, tokenizer, prompts, completions, max_length, batch_size, device)
    pred = scores.view(len(examples), len(label_words)).argmax(-1)
    gold = torch.tensor([e["label"] for e in examples])
    return float((pred == gold).float().mean())


def evaluate_lm(forward: Forward, tokenizer, items: list[dict], examples: list[dict], label_words, max_length: int,
                batch_size: int, device) -> dict[str, float]:
    """``eval/loss`` over the eval split and, for classification data, ``eval/accuracy``."""
    if not items:
        return {}
    metrics = {"eval/loss": completion_loss(forward, items, tokenizer.pad_token_id, batch_size, device)}
    if label_words and all("label" in e for e in examples):
        metrics["eval/accuracy"] = label_word_accuracy(forward, tokenizer, examples, label_words, max_length,
                                                       batch_size, device)
    return metrics
