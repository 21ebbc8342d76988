"""Build ``bundled:tiny-opt-sentiment``: a tiny OPT with a prior for the sentiment task (the quick start's base).

Run from the repository root (a few minutes on 2 CPU cores, deterministic for a torch build):

    .venv/bin/python scripts/build_prior_model.py            # pretrain, write the asset + build.json
    .venv/bin/python scripts/build_prior_model.py --eval     # zero-shot eval of the saved asset
    .venv/bin/python scripts/build_prior_model.py --out DIR --steps 50   # a short build elsewhere (tests)

What MeZO/ZO2 needs (Malladi et al. 2023, research/zo2.md): a *pretrained* LM whose prompt already makes the label
words likely and whose hidden states already separate the classes, so that the forward-only SPSA estimate has a
low-dimensional direction to follow.  A random or generic base (``bundled:tiny-opt-base``) gives ZO only the
"put mass on the label words" direction: the loss falls, accuracy does not move.

The corpus (generated here, fixed seed, no download) has four parts.  It never holds a sentence of the task's
default splits (``SyntheticSentiment(seed=0)``), and never pairs a review with its *correct* label word more often
than with the wrong one:

* review sentences in the task's style (the task's templates and word lists, drawn with a seed of their own, the
  task's sentences removed), 70% followed by a verdict in *other* phrasing that names the sentiment with the label
  words: "Overall, a great film.", "In a word: terrible." ...  The hidden states learn to carry the review's
  sentiment and tie it to "great"/"terrible" in those templates.
* the other 30% of the review sentences followed by "It was great" / "It was terrible" drawn by a fair coin,
  independent of the review (``--coin-share``).  The prompt thus makes the label words the likely, calibrated
  continuation (zero-shot eval loss ~0.34 nats a token, not ~5), but the base has no reason to pick the right one:
  its zero-shot accuracy stays near chance (0.625 on the eval split).  A calibrated prompt matters for SPSA: with
  confidently wrong label words (tried first: neutral-context "It was great" only) the early projected gradients
  are huge and ZO's random-direction steps wreck the features before they help.
* generic English sentences (the generator of ``scripts/build_tokenizer.py``), half followed by a coin-flip
  "It was great" / "It was terrible" (``--great-bias`` 0.5).
* short sentences where sentiment words co-occur with "great"/"terrible" in other templates.

ZO fine-tuning then only has to route the sentiment the model already encodes into the "It was" continuation.
The script writes ``build.json`` next to the weights: the arguments, the corpus size and SHA-256, the weights'
SHA-256 and the zero-shot metrics it measured; ``tests/plugins/basics/test_prior_model.py`` rebuilds a short
version and checks the shipped files against it.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "plugins" / "basics" / "assets" / "tiny-opt-sentiment"
CORPUS_SEED = 20261205  # disjoint from the task's default seed (0) and the tokenizer's corpus seed (0)
GREAT_BIAS = 0.5  # share of "It was great" among the neutral "It was <label word>" lines
ARCH = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 256}


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


POS_VERDICTS = [
    "Overall, a great film.", "In a word: great.", "Honestly great.", "My verdict: great.",
    "Truly great stuff.", "I would call it great.", "A great {film}.", "Great {noun}, great fun.",
    "Two thumbs up, a great {film}.", "The verdict is great.",
]
POS_OTHER = ["Two thumbs up.", "Highly recommended.", "Worth every minute.", "See it twice.", "A fine {film}."]
NEG_OTHER = ["Two thumbs down.", "Not recommended.", "A waste of time.", "Skip it.", "A poor {film}."]
NEG_VERDICTS = [
    "Overall, a terrible film.", "In a word: terrible.", "Honestly terrible.", "My verdict: terrible.",
    "Truly terrible stuff.", "I would call it terrible.", "A terrible {film}.", "Terrible {noun}, no fun.",
    "Two thumbs down, a terrible {film}.", "The verdict is terrible.",
]
POS_SHORT = [
    "I loved the {noun}; honestly great.", "What a {adj} {film}, truly great.",
    "{subject} {verb} the {noun}: great work.", "Great {noun} and a {adj} {noun2}.",
    "The {noun} is great and the {noun2} is {adj}.", "Such a great {film}; the {noun} was {adj}.",
]
NEG_SHORT = [
    "I hated the {noun}; honestly terrible.", "What a {adj} {film}, truly terrible.",
    "{subject} {verb} the {noun}: terrible work.", "Terrible {noun} and a {adj} {noun2}.",
    "The {noun} is terrible and the {noun2} is {adj}.", "Such a terrible {film}; the {noun} was {adj}.",
]


def corpus(n_generic: int, n_reviews: int, n_short: int, great_bias: float = GREAT_BIAS,
           label_line_share: float = 0.5, verdict_share: float = 1.0, coin_share: float = 0.0) -> list[str]:
    """The pretraining corpus: one line per document, a deterministic function of the arguments."""
    data = _load_module("_plait_basics_data", REPO / "plugins" / "basics" / "data.py")
    tok = _load_module("_plait_build_tokenizer", REPO / "scripts" / "build_tokenizer.py")
    rng = random.Random(CORPUS_SEED)
    lines: list[str] = []

    for s in tok.generic_sentences(n_generic, seed=CORPUS_SEED):
        if rng.random() < label_line_share:  # neutral context: the label word does not depend on the sentence
            # no period: the document ends there, as the task's completion does (label word, then eos)
            s += " It was great" if rng.random() < great_bias else " It was terrible"
        lines.append(s)

    taken = set(data.SyntheticSentiment(seed=0).sentences())
    polarity = {1: (data.POSITIVE_ADJECTIVES, data.POSITIVE_VERBS, POS_VERDICTS, POS_SHORT),
                0: (data.NEGATIVE_ADJECTIVES, data.NEGATIVE_VERBS, NEG_VERDICTS, NEG_SHORT)}

    def fill(template: str, label: int) -> str:
        adjectives, verbs, _, _ = polarity[label]
        noun, noun2 = rng.sample(data.NOUNS, 2)
        return template.format(adj=rng.choice(adjectives), verb=rng.choice(verbs), noun=noun, noun2=noun2,
                               film=rng.choice(data.FILMS), subject=rng.choice(data.SUBJECTS))

    for _ in range(n_reviews):
        label = rng.randrange(2)
        sentence = data._sentence(rng, label)
        if sentence in taken:
            continue
        r = rng.random()
        if r < coin_share:  # "It was <label word>" by a coin flip, independent of the review's sentiment
            lines.append(sentence + (" It was great" if rng.random() < 0.5 else " It was terrible"))
            continue
        if rng.random() < verdict_share:  # a verdict that names the label word
            sentence += " " + fill(rng.choice(polarity[label][2]), label)
        else:  # a verdict in other words
            sentence += " " + fill(rng.choice((POS_OTHER, NEG_OTHER)[1 - label]), label)
        lines.append(sentence)

    for _ in range(n_short):
        label = rng.randrange(2)
        s = fill(rng.choice(polarity[label][3]), label)
        lines.append(s[0].upper() + s[1:])

    rng.shuffle(lines)
    # Without coin-flip review lines, "It was <label word>" only ever follows a generic (non-review) sentence.
    review_words = set(data.POSITIVE_ADJECTIVES + data.NEGATIVE_ADJECTIVES + data.POSITIVE_VERBS
                       + data.NEGATIVE_VERBS)
    for line in lines:
        if "It was great" in line or "It was terrible" in line:
            head = line.split(" It was ")[0]
            assert coin_share or not review_words & set(head.replace(".", " ").replace(",", " ").split()), line
    return lines


_BASE = _load_module("_plait_build_base_model", REPO / "scripts" / "build_base_model.py")


def pretrain(lines: list[str], steps: int, batch_size: int, lr: float, seed: int, log_every: int = 200):
    """The base model's pretraining loop (scripts/build_base_model.py) at this model's shape, dropout off."""
    return _BASE.pretrain(lines, steps, batch_size, lr, log_every=log_every, seed=seed,
                          config=dict(ARCH, dropout=0.0))


zero_shot = _BASE.zero_shot


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", type=Path, default=OUT, help="output directory (default: the bundled asset)")
    parser.add_argument("--steps", type=int, default=1500, help="AdamW steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed (default 0)")
    parser.add_argument("--n-generic", type=int, default=12000)
    parser.add_argument("--n-reviews", type=int, default=12000)
    parser.add_argument("--n-short", type=int, default=4000)
    parser.add_argument("--great-bias", type=float, default=GREAT_BIAS)
    parser.add_argument("--label-line-share", type=float, default=0.5,
                        help="share of generic sentences followed by 'It was great/terrible' (0.5)")
    parser.add_argument("--verdict-share", type=float, default=1.0,
                        help="share of the other reviews whose verdict names great/terrible (1.0)")
    parser.add_argument("--coin-share", type=float, default=0.3,
                        help="share of review sentences followed by a coin-flip 'It was great/terrible' (0.3)")
    parser.add_argument("--eval", action="store_true", help="only evaluate the saved model zero-shot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the shipped asset was built so (OMP_NUM_THREADS=1); bit-reproducible

    if args.eval:
        from plait.plugins.basics.models import build_causal_lm
        model, tokenizer = build_causal_lm(path=args.out)
        model.eval()
        metrics = zero_shot(model, tokenizer)
        print("zero-shot on the task eval split: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return 0

    lines = corpus(args.n_generic, args.n_reviews, args.n_short, args.great_bias, args.label_line_share,
                   args.verdict_share, args.coin_share)
    corpus_sha = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    print(f"corpus: {len(lines)} lines (sha256 {corpus_sha[:16]}), e.g. {lines[:3]}")
    model, tokenizer = pretrain(lines, args.steps, args.batch_size, args.lr, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    metrics = zero_shot(model, tokenizer)
    print("zero-shot on the task eval split: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    record = {
        "script": "scripts/build_prior_model.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "eval")},
        "arch": ARCH, "corpus_seed": CORPUS_SEED, "corpus_lines": len(lines), "corpus_sha256": corpus_sha,
        "torch": torch.__version__,
        "model_sha256": sha256(args.out / "model.safetensors"),
        "zero_shot": {k: round(float(v), 6) for k, v in metrics.items()},
    }
    (args.out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
