"""Tokenizer loading for the basics plugins.

``load_tokenizer()`` returns the small byte-level BPE tokenizer bundled in
``assets/tokenizer.json`` (built by ``scripts/build_tokenizer.py``; vocab
1024, ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3).  It needs no
network.  ``load_tokenizer(dir)`` loads a saved Hugging Face tokenizer from a
local directory and ``load_tokenizer(file.json)`` a ``tokenizers`` JSON file.

The tokenizer adds no bos/eos by itself when called;
``plait.plugins.basics.data.tokenize_example`` adds them.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / "assets"
BUNDLED = ASSETS / "tokenizer.json"

# The special tokens of the bundled tokenizer; a loaded tokenizer that lacks
# one of these roles gets it if its vocabulary has the token.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Load the bundled tokenizer (``path`` None), a tokenizer directory, or a .json file.

    Special tokens the tokenizer already defines are kept; missing roles are
    filled from ``<pad>``/``<s>``/``</s>``/``<unk>`` when the vocabulary has
    them, and a still-missing pad token falls back to eos (padding is masked
    out, so which id pads does not matter).  Padding is on the right.
    """
    if path is None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED))
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path does not exist: {p}")
        if p.is_dir():
            # local_files_only: a typo'd path must never turn into a hub download.
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        elif p.suffix == ".json":
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(p))
        else:
            raise ValueError(
                f"tokenizer path {p} is neither a directory nor a .json file; "
                "pass a directory saved with save_pretrained() or a tokenizers JSON file"
            )

    vocab = tokenizer.get_vocab()
    missing = {role: tok for role, tok in SPECIAL_TOKENS.items()
               if getattr(tokenizer, role) is None and tok in vocab}
    if missing:
        tokenizer.add_special_tokens(missing)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer
