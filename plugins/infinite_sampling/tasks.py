"""Bundled verifiable tasks for GRPO: small enough that a tiny model learns them by RL on a CPU.

Same interface as the datasets of ``plait.plugins.basics.data``:
``examples(split)`` for split in ``("train", "eval")`` returns a list of
fresh dicts with ``prompt: str``, ``answer: str`` (the verifiable target,
for ``rewards.ExactMatch("answer")``) and ``completion: str`` (= answer, so
the same data also feeds supervised warm-up through
``basics.data.tokenize_example``).  ``label_words`` is None (not a
classification task).  Every task is a deterministic function of its
arguments (``seed`` included), and train and eval prompts are disjoint.

The formats are chosen for the bundled byte-level BPE tokenizer
(``basics.tokenizer.load_tokenizer()``, vocab 1024):

* ``AdditionTask``: ``"3+4="`` -> ``"7"``.  Each digit, ``+`` and ``=`` is
  one token, so the prompt is ``n_operands * 2`` tokens and the answer is
  one token per digit.  There is deliberately no space before the answer:
  the bundled tokenizer splits ``" 7"`` into two tokens (``Ġ`` + ``7``).
  The default (two operands 0..9, sum <= 9) has single-token answers, the
  easiest target for RL from scratch: the policy only has to put the right
  digit first (and then EOS).

  Measured (throwaway script, not a test; random-init 2-layer GPT-2, width
  64, 1 CPU thread, G=16, Adam 1e-3, dapo, μ=1): with one generated token
  and rewards ``ExactMatch`` + 0.2 * ``RegexFormat(r"[0-9]")``, sampled train
  accuracy went 0 -> ~0.48 in ~2 min (greedy eval 0.27; chance is 0.1).
  Requiring digit + EOS (two tokens) from random init gave no exact match
  in 3 min: the reward is too sparse (~1e-4 per sample) - generate one
  token, or warm up with SFT on ``completion`` first.
* ``CopyTask``: ``"copy: a b c ="`` -> ``" a b c"``.  Each ``" x"`` for the
  default letters is one token, so the answer is one token per symbol.
"""

from __future__ import annotations

import itertools
import random

SPLITS = ("train", "eval")

# Lowercase letters whose " x" form is a single token of the bundled tokenizer.
SINGLE_TOKEN_LETTERS = "abcdefghjklmnopqstwy"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _split_sizes(total: int, n_train: int | None, n_eval: int, what: str) -> tuple[int, int]:
    if n_eval < 0 or (n_train is not None and n_train < 0):
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    if n_eval > total:
        raise ValueError(f"n_eval={n_eval} exceeds the {total} distinct {what}")
    if n_train is None:
        n_train = total - n_eval
    if n_train + n_eval > total:
        raise ValueError(
            f"n_train + n_eval = {n_train + n_eval} exceeds the {total} distinct {what}; "
            "ask for fewer examples or widen the task"
        )
    return n_train, n_eval


class _Task:
    label_words = None
    _examples: dict[str, list[dict]]

    def examples(self, split: str) -> list[dict]:
        _check_split(split)
        return [dict(e) for e in self._examples[split]]  # copies: callers may mutate

    @staticmethod
    def _example(prompt: str, answer: str) -> dict:
        return {"prompt": prompt, "answer": answer, "completion": answer}


class AdditionTask(_Task):
    """Addition of small numbers: prompt ``"3+4="``, answer ``"7"``.

    Every problem with ``n_operands`` operands in ``0..max_operand`` (and,
    if ``max_sum`` is set, sum <= max_sum) is enumerated, shuffled by
    ``seed``, and cut into ``n_eval`` eval problems and ``n_train`` train
    problems (default: all the rest).  Operand order matters: "3+4=" and
    "4+3=" are different problems.  The default has 55 problems
    (44 train / 11 eval), all with single-digit (single-token) answers.
    """

    def __init__(
        self,
        n_train: int | None = None,
        n_eval: int = 11,
        seed: int = 0,
        max_operand: int = 9,
        max_sum: int | None = 9,
        n_operands: int = 2,
    ):
        if max_operand < 0:
            raise ValueError(f"max_operand must be >= 0, got {max_operand}")
        if n_operands < 2:
            raise ValueError(f"n_operands must be >= 2, got {n_operands}")
        self.max_operand, self.max_sum, self.n_operands, self.seed = max_operand, max_sum, n_operands, seed
        problems = [
            ops for ops in itertools.product(range(max_operand + 1), repeat=n_operands)
            if max_sum is None or sum(ops) <= max_sum
        ]
        random.Random(seed).shuffle(problems)
        self.n_train, self.n_eval = _split_sizes(len(problems), n_train, n_eval, "addition problems")
        chunks = {
            "eval": problems[: self.n_eval],
            "train": problems[self.n_eval: self.n_eval + self.n_train],
        }
        self._examples = {
            split: [self._example("+".join(map(str, ops)) + "=", str(sum(ops))) for ops in chunk]
            for split, chunk in chunks.items()
        }


class CopyTask(_Task):
    """Copy a sequence of symbols: prompt ``"copy: a b c ="``, answer ``" a b c"``.

    Sequences have ``min_len..max_len`` symbols drawn from ``alphabet``
    (default: 8 letters whose ``" x"`` is one token of the bundled
    tokenizer); distinct sequences are drawn by ``seed``, the first
    ``n_eval`` go to eval and the next ``n_train`` to train.
    """

    prompt_prefix = "copy:"
    prompt_suffix = " ="

    def __init__(
        self,
        n_train: int = 256,
        n_eval: int = 64,
        seed: int = 0,
        alphabet: str = SINGLE_TOKEN_LETTERS[:8],
        min_len: int = 1,
        max_len: int = 3,
    ):
        symbols = list(alphabet)
        if not symbols or len(set(symbols)) != len(symbols) or any(s.isspace() or s == "=" for s in symbols):
            raise ValueError(f"alphabet must be distinct non-space characters other than '=', got {alphabet!r}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len} and {max_len}")
        self.alphabet, self.min_len, self.max_len, self.seed = alphabet, min_len, max_len, seed
        total = sum(len(symbols) ** k for k in range(min_len, max_len + 1))
        self.n_train, self.n_eval = _split_sizes(total, n_train, n_eval, "sequences")
        need = self.n_train + self.n_eval
        rng = random.Random(seed)
        if total <= 100_000:
            every = [seq for k in range(min_len, max_len + 1) for seq in itertools.product(symbols, repeat=k)]
            seqs = rng.sample(every, need)
        else:  # too many to list: draw with rejection (need <= total, so this ends)
            unique: dict[tuple, None] = {}
            while len(unique) < need:
                k = rng.randint(min_len, max_len)
                unique.setdefault(tuple(rng.choice(symbols) for _ in range(k)), None)
            seqs = list(unique)
        chunks = {"eval": seqs[: self.n_eval], "train": seqs[self.n_eval:]}
        self._examples = {
            split: [self._example(self.prompt_for(seq), "".join(" " + s for s in seq)) for seq in chunk]
            for split, chunk in chunks.items()
        }

    def prompt_for(self, seq) -> str:
        return self.prompt_prefix + "".join(" " + s for s in seq) + self.prompt_suffix
