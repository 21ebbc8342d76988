"""Log-probs of rollouts under a policy, the forwards of recipe ``grpo``'s loss, snapshot and reference.

* `completion_logp`: the next-token log-probs ``[N, T-1]`` of `Rollouts.sequences` rows and the completion mask
  aligned with them, from one forward (logits promoted to fp32 at least);
* `micro_batches` / `take_rows` / `batched_logp`: the same ``micro_batch_size`` rows at a time, each micro-batch
  trimmed to its longest row (right padding only, so the kept positions' logits do not change), without gradient:
  the old-policy snapshot and the reference model;
* `pack_groups` / `packed_logp`: the ``B * G`` rows packed into ``B`` rows, one per prompt (its G rollouts side by
  side, a block-diagonal causal 4-D mask, positions restarting in every rollout), read back in the unpacked
  layout. One packed row per prompt makes a per-sample gradient (DP) the gradient of one prompt's G rollouts; the
  attention of a packed row is quadratic in G * (prompt + completion) length;
* `check_packing`: the largest |Δ log-prob| between packed and unpacked rows on made-up rollouts, so that a model
  that does not honour the 4-D mask and positions is refused at start-up (above `PACKING_TOLERANCE`).
"""
from __future__ import annotations

import torch

PACKING_TOLERANCE = 1e-3  # |Δ log-prob| between packed and unpacked rollouts accepted by the start-up check


def completion_logp(model, seqs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token ``[N, T-1]`` and the completion mask aligned with them."""
    logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"]).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    targets = seqs["input_ids"][:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, seqs["completion_mask"][:, 1:]


def micro_batches(n: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows (``size`` 0: one slice of all ``n``)."""
    size = size if size > 0 else n
    return [slice(k, min(k + size, n)) for k in range(0, n, size)]


def take_rows(seqs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Rows of `Rollouts.sequences`, trimmed to their longest row (right padding only, so the causal logits of
    the kept positions do not change)."""
    width = int(seqs["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in seqs.items()}


@torch.no_grad()
def batched_logp(model, seqs: dict[str, torch.Tensor], micro_batch_size: int = 0) -> torch.Tensor:
    """`completion_logp` ``[N, T-1]`` computed ``micro_batch_size`` rows at a time (0 at padded positions past a
    micro-batch's longest row), for the old-policy snapshot and the reference model."""
    n, t = seqs["input_ids"].shape
    out = torch.zeros((n, t - 1), dtype=torch.float32, device=seqs["input_ids"].device)
    for rows in micro_batches(n, micro_batch_size):
        logp = completion_logp(model, take_rows(seqs, rows))[0]
        out = out.to(logp.dtype)
        out[rows, :logp.shape[1]] = logp
    return out


def pack_groups(seqs: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """The ``N = B * G`` rows of `Rollouts.sequences` packed into ``B`` rows, one per prompt: its G rollouts side
    by side (each prompt + completion, padding dropped), with a block-diagonal causal mask (a token attends only to
    its own rollout's earlier tokens) and positions restarting at 0 in every rollout, so each rollout's logits are
    those of its own unpacked row (up to float rounding). Returns ``input_ids`` / ``position_ids`` ``[B, L]``,
    ``segment`` ``[B, L]`` (the rollout of each position, -1 on padding) and, to read the packed log-probs back in
    the unpacked layout ``[N, T-1]``, ``row`` / ``col`` (where row n's next-token log-prob t lies) and ``valid``.
    One packed row per prompt is what makes a per-sample gradient (DP) a per-prompt gradient."""
    ids, attn = seqs["input_ids"], seqs["attention_mask"]
    n, t = ids.shape
    if n % group_size:
        raise ValueError(f"{n} rows are not groups of {group_size}")
    b = n // group_size
    lengths = attn.sum(1).tolist()
    width = max(sum(lengths[p * group_size:(p + 1) * group_size]) for p in range(b))
    packed = torch.zeros((b, width), dtype=ids.dtype)
    positions = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)
    row = torch.zeros((n, t - 1), dtype=torch.long)
    col = torch.zeros((n, t - 1), dtype=torch.long)
    valid = torch.zeros((n, t - 1), dtype=torch.bool)
    ids_cpu = ids.cpu()
    for p in range(b):
        offset = 0
        for i in range(group_size):
            r, length = p * group_size + i, lengths[p * group_size + i]
            packed[p, offset:offset + length] = ids_cpu[r, :length]
            positions[p, offset:offset + length] = torch.arange(length)
            segment[p, offset:offset + length] = i
            row[r] = p
            col[r, :length - 1] = torch.arange(offset, offset + length - 1)
            valid[r, :length - 1] = True
            offset += length
    device = ids.device
    return {"input_ids": packed.to(device), "position_ids": positions.to(device), "segment": segment.to(device),
            "row": row.to(device), "col": col.to(device), "valid": valid.to(device)}


def packed_logp(model, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """`completion_logp`'s log-probs ``[N, T-1]`` (0 past each row's end) from one forward of the packed rows
    (`pack_groups`): a 4-D additive attention mask (0 where a token may attend, the dtype's minimum elsewhere; a
    padding position attends to itself only) and explicit ``position_ids``, which HF causal LMs take as given."""
    seg = packed["segment"]
    width = seg.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal
    allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
    ids = packed["input_ids"]
    logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=packed["position_ids"]).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    out = logp[packed["row"], packed["col"]]
    return torch.where(packed["valid"], out, torch.zeros((), dtype=out.dtype, device=out.device))


def check_packing(model, prompts: list[list[int]], pad_id: int) -> float:
    """Largest |Δ log-prob| between `packed_logp` and `completion_logp` on two short made-up rollouts of each of
    up to two train prompts (every position compared): a model that ignores the 4-D mask or the positions shows
    a large difference."""
    rows = [p + p[-1:] * k for p in prompts[:2] for k in (1, 2)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        attn[r, :len(row)] = 1
    device = next(model.parameters()).device
    seqs = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "completion_mask": attn.to(device)}
    with torch.no_grad():
        ref, mask = completion_logp(model, seqs)
        got = packed_logp(model, pack_groups(seqs, 2))
    return float(((got - ref).abs() * mask).max())
