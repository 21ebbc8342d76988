"""Build the tiny pretrained OPT bundled with the basics plugins (``bundled:tiny-opt-base``).

Run from the repository root (about a minute or two on 2 CPU cores):

    .venv/bin/python scripts/build_base_model.py            # pretrain, write the asset, print zero-shot eval
    .venv/bin/python scripts/build_base_model.py --eval     # only evaluate the saved asset zero-shot

It pretrains ``build_causal_lm(arch="opt", size="tiny")`` (the bundled
tokenizer's vocabulary, ~0.17M parameters) as a plain causal LM with AdamW on
a generated corpus, then ``save_pretrained``s it (fp32 safetensors, under
1 MB) with the tokenizer to ``plugins/basics/assets/tiny-opt-base/``.  Load it
with ``build_causal_lm(path="bundled:tiny-opt-base")`` or, in a config,
``model: {name: hf_causal_lm, path: "bundled:tiny-opt-base"}``.

Why: zeroth-order fine-tuning (MeZO / ZO2) adapts a *pretrained* language
model; from a random init it lowers the loss but does not learn the task.  The
tests and GRPO presets use this base; the quick start now uses
``tiny-opt-sentiment`` (``scripts/build_prior_model.py``, which reuses this
script's pretraining loop), whose corpus gives the prompt's label words a prior.

The corpus is deterministic (fixed seeds, no download) and mixes

* generic English sentences (the generator of ``scripts/build_tokenizer.py``,
  with its own seed), some followed by a neutral "It was <adjective>." line;
* movie-review sentences of the synthetic sentiment task's style, drawn with a
  seed of their own and with every sentence of the task's default splits
  (``SyntheticSentiment(seed=0)``) removed, followed by a verdict in *other*
  words ("Overall, a great film.", "In a word: terrible." ...) or by nothing;
* short natural sentences where sentiment words co-occur with other
  continuations ("I loved the acting; honestly great.", "What a dull film,
  truly terrible." ...).

It never contains the task's prompt format (a review sentence followed by
" It was great" / " It was terrible"; the script asserts that no line contains
"It was great" or "It was terrible"), so the base associates sentiment words
with "great"/"terrible" but has not learnt the task: its zero-shot accuracy on
the task prompt is far below what ZO fine-tuning reaches.  Training on CPU is
deterministic for a given torch build, not bit-identical across builds.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "plugins" / "basics" / "assets" / "tiny-opt-base"
CORPUS_SEED = 20240611  # disjoint from the task's default seed (0) and the tokenizer corpus seed (0)
TRAIN_SEED = 0
N_GENERIC = 12000
N_REVIEWS = 12000
N_SHORT = 6000


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


POS_VERDICTS = [
    "Overall, a great film.", "In a word: great.", "Honestly great.", "My verdict: great.",
    "Truly great stuff.", "I would call it great.", "A great {film}.", "Great {noun}, great fun.",
    "Overall, a {adj} {film}.", "Simply {adj}.", "What a {adj} {film}!", "Two thumbs up.",
]
NEG_VERDICTS = [
    "Overall, a terrible film.", "In a word: terrible.", "Honestly terrible.", "My verdict: terrible.",
    "Truly terrible stuff.", "I would call it terrible.", "A terrible {film}.", "Terrible {noun}, no fun.",
    "Overall, a {adj} {film}.", "Simply {adj}.", "What a {adj} {film}!", "Two thumbs down.",
]
POS_SHORT = [
    "I loved the {noun}; honestly great.", "What a {adj} {film}, truly great.", "The {noun} felt {adj}.",
    "{subject} {verb} the {noun}: great work.", "Great {noun} and a {adj} {noun2}.",
    "A {adj} {noun}, and a great {film} overall.", "The {noun} is great and the {noun2} is {adj}.",
    "Such a great {film}; the {noun} was {adj}.", "Great, {adj}, and never dull.",
]
NEG_SHORT = [
    "I hated the {noun}; honestly terrible.", "What a {adj} {film}, truly terrible.", "The {noun} felt {adj}.",
    "{subject} {verb} the {noun}: terrible work.", "Terrible {noun} and a {adj} {noun2}.",
    "A {adj} {noun}, and a terrible {film} overall.", "The {noun} is terrible and the {noun2} is {adj}.",
    "Such a terrible {film}; the {noun} was {adj}.", "Terrible, {adj}, and never fun.",
]


def corpus() -> list[str]:
    """The pretraining corpus: one line per document, deterministic."""
    data = _load_module("_plait_basics_data", REPO / "plugins" / "basics" / "data.py")
    tok = _load_module("_plait_build_tokenizer", REPO / "scripts" / "build_tokenizer.py")
    rng = random.Random(CORPUS_SEED)
    lines: list[str] = []

    # Generic English, a third of it with a neutral "It was <adjective>." line after it.
    for s in tok.generic_sentences(N_GENERIC, seed=CORPUS_SEED):
        if rng.random() < 0.33:
            s += f" It was {rng.choice(tok.ADJECTIVES)}."
        lines.append(s)

    # Review sentences (task style, new draws, task sentences removed) with a verdict in other words.
    taken = set(data.SyntheticSentiment(seed=0).sentences())
    polarity = {1: (data.POSITIVE_ADJECTIVES, data.POSITIVE_VERBS, POS_VERDICTS, POS_SHORT),
                0: (data.NEGATIVE_ADJECTIVES, data.NEGATIVE_VERBS, NEG_VERDICTS, NEG_SHORT)}

    def fill(template: str, label: int) -> str:
        adjectives, verbs, _, _ = polarity[label]
        noun, noun2 = rng.sample(data.NOUNS, 2)
        return template.format(adj=rng.choice(adjectives), verb=rng.choice(verbs), noun=noun, noun2=noun2,
                               film=rng.choice(data.FILMS), subject=rng.choice(data.SUBJECTS))

    for _ in range(N_REVIEWS):
        label = rng.randrange(2)
        sentence = data._sentence(rng, label)
        if sentence in taken:
            continue
        r = rng.random()
        if r < 0.75:
            sentence += " " + fill(rng.choice(polarity[label][2]), label)
        elif r < 0.85:
            sentence += " " + data._sentence(rng, label)  # two sentences of one review
        lines.append(sentence)

    for _ in range(N_SHORT):
        label = rng.randrange(2)
        s = fill(rng.choice(polarity[label][3]), label)
        lines.append(s[0].upper() + s[1:])

    rng.shuffle(lines)
    for line in lines:
        assert "It was great" not in line and "It was terrible" not in line, line
    return lines


def pretrain(lines: list[str], steps: int, batch_size: int, lr: float, log_every: int = 100,
             seed: int = TRAIN_SEED, config: dict | None = None):
    """AdamW next-token pretraining of a tiny OPT (``config`` overrides its shape) on ``lines``; also used by
    scripts/build_prior_model.py."""
    from plait.plugins.basics.data import collate
    from plait.plugins.basics.models import build_causal_lm
    from plait.plugins.basics.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    model, tokenizer = build_causal_lm(arch="opt", size="tiny", config=config, tokenizer=tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = [{"input_ids": [bos] + ids + [eos], "labels": [bos] + ids + [eos]}
            for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos, t0 = torch.randperm(len(docs), generator=g), 0, time.time()
    for step in range(1, steps + 1):
        if pos + batch_size > len(docs):
            perm, pos = torch.randperm(len(docs), generator=g), 0
        batch = collate([docs[i] for i in perm[pos:pos + batch_size].tolist()], tokenizer.pad_token_id)
        pos += batch_size
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model, tokenizer


def zero_shot(model, tokenizer) -> dict[str, float]:
    """eval/loss and eval/accuracy on the task's default eval split, as the zo recipe reports them."""
    from plait.plugins.basics.data import SyntheticSentiment
    from plait.plugins.basics.evaluation import evaluate_lm
    from plait.plugins.basics.parts import tokenize_split

    data = SyntheticSentiment()
    examples = data.examples("eval")
    items = tokenize_split(tokenizer, examples, 128)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    with torch.no_grad():
        return evaluate_lm(forward, tokenizer, items, examples, data.label_words, 128, 64, "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval", action="store_true", help="only evaluate the saved model zero-shot")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    if args.eval:
        from plait.plugins.basics.models import build_causal_lm
        model, tokenizer = build_causal_lm(path=args.out)
        model.eval()
    else:
        lines = corpus()
        print(f"corpus: {len(lines)} lines, e.g. {lines[:3]}")
        model, tokenizer = pretrain(lines, args.steps, args.batch_size, args.lr)
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    metrics = zero_shot(model, tokenizer)
    print("zero-shot on the task eval split: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
