"""A slot-based KV cache for Hugging Face decoder-only models (OPT, Qwen3, LLaMA; transformers 5.x).

Layout: per layer, ``keys`` and ``values`` of shape ``[rows, n_kv_heads, capacity + 1, head_dim]``, preallocated.
Row ``r`` holds one sequence left-aligned: token ``t`` of the row (prompt first) at index ``t``, ``lengths[r]``
tokens valid. Index ``capacity`` is a scratch column that rows sitting out a forward write into (one token per
row of overhead, never counted as live).

A decode forward (`SlotKVCache.decode`) feeds one token per row, with

* ``position_ids[r] = lengths[r]`` for rows that take part (0 for the others),
* a 4-D additive mask ``[rows, 1, 1, capacity + 1]``: 0 on ``[0, lengths[r]]`` (the history and the token being
  written), dtype-min elsewhere; rows sitting out see only their scratch column,
* the cache itself (``cache=self``, or ``past_key_values=self`` on transformers releases that name it so, up to
  5.17 at least: `cache_kwarg`) — `SlotLayer.update` writes the new K/V of each row at its own position in place and
  hands the whole slot tensors to attention, so HF's attention code runs unchanged (transformers returns a 4-D mask
  as-is). A model that never calls ``update`` (the keyword ignored) raises instead of decoding without the cache.

Rows are filled from a `PromptKV` (one prefill of the prompt, batch 1, copied into the row: prefix sharing) and
released by setting their length to 0 (eviction costs nothing; the next fill overwrites the row).

Live KV bytes are measured from the cache tensors: for every layer, ``element_size * n_kv * head_dim`` of K and
of V times the valid tokens of the occupied rows. ``kv_bytes_per_token(model)`` is the analytic value
``2 * n_layers * n_kv_heads * head_dim * bytes_per_element`` used by tests as the oracle.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


def kv_geometry(model) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` from an HF model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, n_kv, head_dim


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Analytic KV bytes one token costs: 2 (K and V) x layers x kv heads x head dim x element size."""
    n_layers, n_kv, head_dim = kv_geometry(model)
    dtype = dtype or next(model.parameters()).dtype
    return 2 * n_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` (transformers 5.25) or ``past_key_values``
    (4.x and 5.x up to 5.17 at least; an unknown ``cache=`` there falls into ``**kwargs`` and is ignored)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _ignored_cache(model) -> RuntimeError:
    return RuntimeError(
        f"{type(model).__name__}.forward did not write the KV cache passed as {cache_kwarg(model)}=...; "
        "infinite_sampling needs a Hugging Face causal LM (transformers 5.x) that uses the cache it is given")


@dataclass
class PromptKV:
    """One prompt's prefill: per-layer K/V ``[n_kv, P, head_dim]`` and the logits after its last token ``[V]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_logits: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@torch.no_grad()
def prefill(model, prompt_ids: list[int]) -> PromptKV:
    """Run the prompt alone (batch 1, positions 0..P-1) and keep its KV and last logits."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt_ids), device=device)[None], use_cache=True,
                **{cache_kwarg(model): cache})
    if not cache.layers or any(layer.keys is None for layer in cache.layers):
        raise _ignored_cache(model)
    keys = [layer.keys[0] for layer in cache.layers]
    values = [layer.values[0] for layer in cache.layers]
    return PromptKV(keys, values, out.logits[0, -1].float())


class SlotLayer(CacheLayerMixin):
    """One layer's slot tensors; `update` writes each row's new K/V at ``write_pos[r]`` and returns the slots."""

    is_compileable = False
    is_sliding = False

    def __init__(self, rows: int, n_kv: int, capacity: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (rows, n_kv, capacity + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.is_initialized = True
        self.device = device
        self.write_pos: torch.Tensor | None = None  # [rows], set by SlotKVCache.decode, cleared by update
        self._rows = torch.arange(rows, device=device)

    def lazy_initialization(self, key_states, value_states):  # preallocated
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("SlotLayer.update takes one new token per row (decode); prefill with `prefill`")
        if self.write_pos is None:
            raise RuntimeError("SlotLayer.update called twice in one decode forward, or outside SlotKVCache.decode")
        self.keys[self._rows, :, self.write_pos] = key_states[:, :, 0].to(self.keys.dtype)
        self.values[self._rows, :, self.write_pos] = value_states[:, :, 0].to(self.values.dtype)
        self.write_pos = None
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row and always passed explicitly

    def get_max_length(self) -> int:
        return self.keys.shape[-2] - 1


class SlotKVCache(Cache):
    """Fixed-capacity per-row KV for ``rows`` concurrent sequences (see the module docstring)."""

    def __init__(self, model, rows: int, capacity: int, dtype: torch.dtype | None = None):
        n_layers, n_kv, head_dim = kv_geometry(model)
        param = next(model.parameters())
        dtype = dtype or param.dtype
        super().__init__(layers=[SlotLayer(rows, n_kv, capacity, head_dim, dtype, param.device)
                                 for _ in range(n_layers)])
        self.rows, self.capacity, self.device = rows, capacity, param.device
        self.lengths = [0] * rows
        self.occupied = [False] * rows

    # ----------------------------------------------------------------------------------------- row management
    def fill(self, row: int, prompt: PromptKV) -> None:
        """Place a prompt's KV in ``row`` (copy of the shared prefill); the row then holds ``P`` tokens."""
        p = prompt.length
        if p > self.capacity:
            raise ValueError(f"prompt of {p} tokens does not fit a cache row of capacity {self.capacity}")
        for layer, k, v in zip(self.layers, prompt.keys, prompt.values):
            layer.keys[row, :, :p] = k
            layer.values[row, :, :p] = v
        self.lengths[row] = p
        self.occupied[row] = True

    def release(self, row: int) -> None:
        """Evict a row: its tokens stop being live and the next `fill` overwrites them."""
        self.lengths[row] = 0
        self.occupied[row] = False

    # ----------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, model, tokens: list[int], active: list[bool]) -> torch.Tensor:
        """Feed ``tokens[r]`` for the rows with ``active[r]``; returns float logits ``[rows, V]``."""
        pos, mask_len = [], []
        for r in range(self.rows):
            if active[r]:
                if self.lengths[r] >= self.capacity:
                    raise ValueError(f"cache row {r} is full (capacity {self.capacity}); raise cache_capacity")
                pos.append(self.lengths[r])
                mask_len.append(self.lengths[r] + 1)
            else:
                pos.append(self.capacity)  # scratch column
                mask_len.append(0)
        write_pos = torch.tensor(pos, device=self.device)
        for layer in self.layers:
            layer.write_pos = write_pos
        cols = torch.arange(self.capacity + 1, device=self.device)
        allowed = cols[None, :] < torch.tensor(mask_len, device=self.device)[:, None]
        allowed |= (~torch.tensor(active, device=self.device))[:, None] & (cols[None, :] == self.capacity)
        dtype = self.layers[0].keys.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        position_ids = torch.where(torch.tensor(active, device=self.device), write_pos, 0)[:, None]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        out = model(input_ids=ids, attention_mask=mask[:, None, None, :], position_ids=position_ids, use_cache=True,
                    **{cache_kwarg(model): self})
        if any(layer.write_pos is not None for layer in self.layers):  # some layer never saw this token
            for layer in self.layers:
                layer.write_pos = None
            raise _ignored_cache(model)
        for r in range(self.rows):
            if active[r]:
                self.lengths[r] += 1
        return out.logits[:, -1].float()

    # ----------------------------------------------------------------------------------------- measurement
    def live_bytes(self) -> int:
        """KV bytes of the valid tokens of occupied rows, read from the cache tensors' shapes and dtypes."""
        tokens = sum(n for n, occ in zip(self.lengths, self.occupied) if occ)
        per_token = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                per_token += t.element_size() * t.shape[1] * t.shape[3]
        return tokens * per_token

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated slot tensors (rows x (capacity + 1) tokens)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    # Cache API pieces HF may call
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return self.capacity + 1, 0
