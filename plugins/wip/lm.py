"""The bundled WiP language model (``assets/wip-lm``) and perplexity over token blocks."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .corpus import read_heldout, token_blocks

LM_DIR = Path(__file__).parent / "assets" / "wip-lm"
# LLaMA shape of the bundled model (overrides of the basics "tiny" preset): ~0.92M parameters with the
# 1024-token vocabulary; head_dim 32, grouped-query attention (4 query heads share 2 KV heads).
LM_CONFIG = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 384, "max_position_embeddings": 256}


def load_lm(path: str | Path | None = None, dtype: str = "float32"):
    """``(model, tokenizer)`` of the bundled checkpoint (or a checkpoint written by scripts/train_wip_lm.py)."""
    from plait.plugins.basics.models import build_causal_lm

    directory = Path(path) if path else LM_DIR
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no WiP LM checkpoint in {directory}; build it with "
                                "`python scripts/train_wip_lm.py`")
    model, tok = build_causal_lm(path=directory, dtype=dtype)
    return model.eval(), tok


def heldout_blocks(tokenizer, split: str, block: int, path: str | Path | None = None,
                   limit: int = 0) -> torch.Tensor:
    """``[n, block]`` token blocks of the held-out ``calib`` or ``eval`` text; ``limit`` > 0 keeps the first n."""
    texts = read_heldout(Path(path or LM_DIR) / "heldout.jsonl", split)
    blocks = token_blocks(tokenizer, texts, block)
    return blocks[:limit] if limit else blocks


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over every position of every block (blocks hold no padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / max(count, 1))


class HeldoutText:
    """Dataset ``wip_heldout``: the LM's held-out text; split ``train`` is the calibration text, ``eval`` the
    evaluation text. Examples are ``{"prompt": "", "completion": text}`` (the basics Dataset protocol)."""

    label_words = None

    def __init__(self, path: str | Path | None = None):
        file = Path(path) if path else LM_DIR / "heldout.jsonl"
        self.splits = {"train": read_heldout(file, "calib"), "eval": read_heldout(file, "eval")}

    def examples(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; allowed: train, eval")
        return [{"prompt": "", "completion": t} for t in self.splits[split]]
