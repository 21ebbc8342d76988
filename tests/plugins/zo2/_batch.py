"""The random token batch the zo2 tests step on (not a test module: no ``test_`` prefix)."""
from __future__ import annotations

import torch


def lm_batch(seed: int, low: int, high: int, shape: tuple[int, int], pad: tuple[int, int],
             prompt: int) -> dict[str, torch.Tensor]:
    """Token ids in [low, high) drawn from ``torch.Generator().manual_seed(seed)``; row ``pad[0]`` right-padded by
    ``pad[1]`` tokens (attention mask 0); labels -100 on the first ``prompt`` positions and on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[pad[0], -pad[1]:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
