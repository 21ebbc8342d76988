"""Build the small byte-level BPE tokenizer bundled with the basics plugins.

Run from the repository root:

    .venv/bin/python scripts/build_tokenizer.py            # writes the asset
    .venv/bin/python scripts/build_tokenizer.py --check    # exit 1 if it would change

It writes ``plugins/basics/assets/tokenizer.json`` (about 1024 tokens) and
nothing else; ``plait.plugins.basics.tokenizer.load_tokenizer()`` loads it.

The training corpus is generated here, so no download is needed and the
output is deterministic: every sentence (prompt + completion) of the
synthetic sentiment task, plus generic English sentences made from word lists
so the tokenizer is not specific to one task.  Byte-level BPE starts from all
256 byte symbols, so any text can be encoded (``<unk>`` exists for models
that expect one but is never produced).

Special tokens, in this id order: ``<pad>`` = 0, ``<s>`` (bos) = 1,
``</s>`` (eos) = 2, ``<unk>`` = 3.  The tokenizer adds no special tokens by
itself: ``plait.plugins.basics.data.tokenize_example`` adds bos/eos.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "plugins" / "basics" / "assets" / "tokenizer.json"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order
SEED = 0


def _load_data_module():
    # Load data.py by file path: importing the plait.plugins.basics package
    # would run its __init__, which needs the plait core (maybe not installed).
    path = REPO / "plugins" / "basics" / "data.py"
    spec = importlib.util.spec_from_file_location("_plait_basics_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Word lists for the generic English part of the corpus.
DETERMINERS = ["the", "a", "this", "that", "every", "some", "each", "my", "our", "their", "his", "her"]
NOUNS = [
    "time", "person", "year", "way", "day", "thing", "man", "woman", "child", "world",
    "life", "hand", "part", "place", "week", "company", "system", "program", "question", "work",
    "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money",
    "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word",
    "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power",
    "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name",
    "president", "team", "minute", "idea", "kid", "body", "information", "school", "face", "others",
    "level", "office", "door", "health", "art", "war", "history", "party", "result", "change",
    "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education",
    "model", "data", "computer", "network", "language", "table", "window", "garden", "river", "music",
]
VERBS = [
    "saw", "made", "took", "found", "gave", "told", "asked", "used", "wanted", "needed",
    "kept", "held", "brought", "wrote", "read", "built", "opened", "changed", "followed", "started",
    "helped", "showed", "heard", "played", "moved", "paid", "met", "learned", "understood", "watched",
    "created", "offered", "remembered", "considered", "bought", "sent", "reached", "raised", "passed", "trained",
]
ADJECTIVES = [
    "good", "new", "first", "last", "long", "little", "own", "other", "old", "right",
    "big", "high", "different", "small", "large", "next", "early", "young", "important", "few",
    "public", "bad", "same", "able", "local", "late", "hard", "major", "better", "economic",
    "strong", "possible", "whole", "free", "military", "true", "federal", "full", "special", "easy",
    "clear", "recent", "certain", "personal", "open", "red", "blue", "green", "quiet", "simple",
]
ADVERBS = ["quickly", "slowly", "often", "never", "always", "really", "finally", "still", "already", "almost", "usually", "carefully"]
PREPOSITIONS = ["in", "on", "at", "with", "from", "about", "after", "before", "under", "near", "through", "during"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Maria", "Omar", "Priya", "Wei"]
CONNECTIVES = ["and", "but", "because", "so", "while", "although", "when", "if"]


def _noun_phrase(rng: random.Random) -> str:
    det = rng.choice(DETERMINERS)
    adj = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
    noun = rng.choice(NOUNS)
    if det == "a" and (adj or noun)[0] in "aeiou":
        det = "an"
    return f"{det} {adj}{noun}"


def _clause(rng: random.Random) -> str:
    subject = rng.choice(NAMES) if rng.random() < 0.3 else _noun_phrase(rng)
    adverb = rng.choice(ADVERBS) + " " if rng.random() < 0.3 else ""
    clause = f"{subject} {adverb}{rng.choice(VERBS)} {_noun_phrase(rng)}"
    if rng.random() < 0.5:
        clause += f" {rng.choice(PREPOSITIONS)} {_noun_phrase(rng)}"
    return clause


def generic_sentences(n: int, seed: int = SEED) -> list[str]:
    """``n`` generic English sentences, with some numbers and punctuation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = _clause(rng)
        if rng.random() < 0.4:
            text += f", {rng.choice(CONNECTIVES)} {_clause(rng)}"
        if rng.random() < 0.15:
            text += f" {rng.choice(['in', 'after', 'for'])} {rng.randint(1, 2030)} {rng.choice(['days', 'years', 'steps'])}"
        end = rng.choice([".", ".", ".", "!", "?"])
        if end == "?":
            text = "is it true that " + text
        out.append(text[0].upper() + text[1:] + end)
    return out


def corpus() -> list[str]:
    data = _load_data_module()
    # A large synthetic_sentiment draw: it contains the default splits' style
    # and every sentiment word many times, so those words become single tokens.
    task = data.SyntheticSentiment(n_train=4096, n_eval=1024, seed=SEED)
    lines = [e["prompt"] + e["completion"] for split in ("train", "eval") for e in task.examples(split)]
    lines += generic_sentences(8000)
    return lines


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # GPT-2 style: spaces are part of the following word ("Ġgreat").
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no <unk> ever
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(tok) == i, (tok, tokenizer.token_to_id(tok))
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET, help=f"output file (default {ASSET})")
    parser.add_argument("--check", action="store_true", help="only check that the output is up to date")
    args = parser.parse_args(argv)

    text = build().to_str(pretty=False) + "\n"
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1024:.1f} KiB, vocab {VOCAB_SIZE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
