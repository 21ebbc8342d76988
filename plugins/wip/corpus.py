"""The offline text corpus the WiP language model learns from, and its fixed-length token blocks.

Why this corpus: it must exist on every machine without a download, be real English prose (so a small model
learns something measurable) and be large enough for ~1M parameters. CPython ships two such texts:

* ``pydoc_data.topics``: the reference-manual sections ``help()`` shows (≈ 0.47 MB);
* the docstrings of the standard library's own modules, read with :mod:`ast` (never imported): ≈ 1.6 MB.

Each document gets a stable split from a hash of its name (module path + qualified name, or the topic
name): ``eval`` (5 %), ``calib`` (2 %) or ``train``. Because the stdlib differs a little between Python
versions, ``scripts/train_wip_lm.py`` writes the held-out ``eval``/``calib`` texts next to the checkpoint
(``heldout.jsonl``); evaluation reads them from there, so every machine measures the same text.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

SPLITS = ("train", "calib", "eval")
_MIN_CHARS = 40  # shorter docstrings are mostly "Return self." boilerplate
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def split_of(name: str) -> str:
    """Stable split of a document: ``eval`` for 5 %, ``calib`` for 2 %, else ``train`` (by SHA-1 of ``name``)."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
    return "eval" if bucket < 5 else "calib" if bucket < 7 else "train"


def _topic_documents() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name].strip()


def _docstring_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        stack: list[tuple[ast.AST, str]] = [(tree, rel.as_posix())]
        while stack:
            node, qual = stack.pop()
            doc = ast.get_docstring(node) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if doc and len(doc) >= _MIN_CHARS:
                yield qual, doc.strip()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    stack.append((child, f"{qual}:{child.name}"))


def stdlib_documents(stdlib: str | Path | None = None) -> list[tuple[str, str, str]]:
    """Every document as ``(name, split, text)``: the pydoc topics, then the stdlib docstrings."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder not found: {root}")
    docs = [(n, split_of(n), t) for n, t in _topic_documents()]
    docs += [(n, split_of(n), t) for n, t in _docstring_documents(root)]
    return docs


def write_heldout(docs: list[tuple[str, str, str]], path: Path) -> None:
    """Write the ``calib`` and ``eval`` documents as JSON Lines ``{"name", "split", "text"}``."""
    with open(path, "w", encoding="utf-8") as f:
        for name, split, text in docs:
            if split != "train":
                f.write(json.dumps({"name": name, "split": split, "text": text}) + "\n")


def read_heldout(path: Path, split: str) -> list[str]:
    """The texts of ``split`` (``calib`` or ``eval``) from a ``heldout.jsonl`` written by :func:`write_heldout`."""
    if split not in ("calib", "eval"):
        raise ValueError(f"unknown held-out split {split!r}; allowed: calib, eval")
    if not Path(path).is_file():
        raise FileNotFoundError(f"held-out text not found: {path}; rebuild with `python scripts/train_wip_lm.py`")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["text"] for r in rows if r["split"] == split]


def token_blocks(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """Concatenate ``<s> text </s>`` for every text and cut into ``[n, block]`` blocks (the tail is dropped)."""
    if block < 2:
        raise ValueError(f"block length must be at least 2, got {block}")
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)
