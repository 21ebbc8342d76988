"""Evaluation shared by language-model recipes: completion loss and label-word accuracy.

Both take ``forward(input_ids, attention_mask) -> logits``, so any engine (plain module, offloaded ZO engine)
can be evaluated the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from plait.run import eval_share, eval_sum

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
def completion_sums(forward: Forward, items: list[dict], pad_id: int, batch_size: int, device) -> tuple[float, int]:
    """(Σ negative log-likelihood, number of completion tokens) over ``items`` (tokenized examples)."""
    nll, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_id).items()}
        picked, mask = _token_logprobs(forward, batch)
        nll -= float(picked.sum())
        count += int(mask.sum())
    return nll, count


def completion_loss(forward: Forward, items: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Mean negative log-likelihood per completion token over ``items`` (tokenized examples)."""
    nll, count = completion_sums(forward, items, pad_id, batch_size, device)
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


def label_word_correct(forward: Forward, tokenizer, examples: list[dict], label_words: list[str], max_length: int,
                       batch_size: int, device) -> int:
    """How many ``examples`` get the label word with the highest log-likelihood after the prompt (MeZO-style)."""
    if not examples:
        return 0
    prompts = [e["prompt"] for e in examples for _ in label_words]
    completions = [w for _ in examples for w in label_words]
    scores = completion_logprobs(forward, tokenizer, prompts, completions, max_length, batch_size, device)
    pred = scores.view(len(examples), len(label_words)).argmax(-1)
    gold = torch.tensor([e["label"] for e in examples])
    return int((pred == gold).sum())


def label_word_accuracy(forward: Forward, tokenizer, examples: list[dict], label_words: list[str], max_length: int,
                        batch_size: int, device) -> float:
    """Accuracy of picking the label word with the highest log-likelihood after the prompt (MeZO-style)."""
    correct = label_word_correct(forward, tokenizer, examples, label_words, max_length, batch_size, device)
    return correct / len(examples) if examples else float("nan")


def evaluate_lm(forward: Forward, tokenizer, items: list[dict], examples: list[dict], label_words, max_length: int,
                batch_size: int, device, run: Any = None) -> dict[str, float]:
    """``eval/loss`` over the eval split and, for classification data, ``eval/accuracy``.

    With ``run`` under a placement that splits evaluation (`plait.run.eval_share`, ddp), each rank scores its
    share of whole eval batches and the token / example counts are summed over ranks: the one-process values.
    """
    if not items:
        return {}
    mine = eval_share(run, len(items), batch_size)
    nll, count = completion_sums(forward, items[mine.start:mine.stop], tokenizer.pad_token_id, batch_size, device)
    sums = [nll, count]
    accuracy = bool(label_words) and all("label" in e for e in examples)
    if accuracy:  # the prompt × label-word rows are batched: shares of whole row batches
        mine = eval_share(run, len(examples), batch_size // math.gcd(batch_size, len(label_words)))
        correct = label_word_correct(forward, tokenizer, examples[mine.start:mine.stop], label_words, max_length,
                                     batch_size, device)
        sums += [correct, len(mine)]
    sums = eval_sum(run, sums)
    metrics = {"eval/loss": sums[0] / max(sums[1], 1)}
    if accuracy:
        metrics["eval/accuracy"] = sums[2] / sums[3] if sums[3] else float("nan")
    return metrics
