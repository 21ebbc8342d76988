"""Sharded model directories: a model larger than RAM, written and loaded one block at a time.

Layout (what ``offload.disk_dir`` streams from)::

    plait_shards.json          manifest: arch, size, HF config overrides, storage dtype, blocks
    resident.safetensors       every parameter outside the transformer blocks (embeddings, norms, head)
    block_00000.safetensors    one flat tensor "flat" per block, parameters in named_parameters() order
    …

`write_sharded_model` builds the resident part for real (it is small), builds the blocks on the meta device
and materialises, initialises, writes and frees them one at a time, so peak memory is one block.
`load_sharded_model` does the reverse: the blocks' parameters become copy-on-write memory-mapped views of the
shards (the files are opened read-only: training changes the model in memory or in the disk tier's working
copy, never the source).

    python scripts/make_shards.py --arch opt --config '{"hidden_size": 5120, …}' --out /data/opt13b
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

from .store import STORAGE_DTYPES, map_flat

MANIFEST = "plait_shards.json"


def _build(arch: str, size: str, config: dict, layers: int | None = None):
    from plait.plugins.basics.models import build_causal_lm

    cfg = dict(config)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return build_causal_lm(arch=arch, size=size, config=cfg)


def _block_list(model) -> tuple[str, torch.nn.ModuleList]:
    from plait.plugins.basics.models import find_blocks

    return find_blocks(model)


def _set_blocks(model, block_path: str, blocks: torch.nn.ModuleList) -> None:
    parent_name, _, attr = block_path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, blocks)


def _meta_blocks(arch: str, size: str, config: dict) -> tuple[Any, str, torch.nn.ModuleList]:
    with torch.device("meta"):
        full, _ = _build(arch, size, config)
    path, blocks = _block_list(full)
    for blk in blocks:
        if any(True for _ in blk.buffers()):
            raise ValueError(f"{type(blk).__name__} holds buffers; sharded loading supports blocks without them")
    return full, path, blocks


def write_sharded_model(out_dir: str | Path, arch: str = "opt", size: str = "tiny", config: dict | None = None,
                        storage_dtype: str = "fp16", seed: int = 0, progress=None) -> Path:
    """Write a randomly initialised model as a sharded directory, never holding more than one block."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    dtype = STORAGE_DTYPES[storage_dtype]
    torch.manual_seed(seed)
    resident, _ = _build(arch, size, config, layers=0)
    save_model(resident, str(out / "resident.safetensors"))
    full, block_path, blocks = _meta_blocks(arch, size, config)
    numels = []
    for i, blk in enumerate(blocks):
        blk.to_empty(device="cpu")
        with torch.no_grad():
            for m in blk.modules():
                full._init_weights(m)
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in blk.parameters()])
        numels.append(flat.numel())
        save_file({"flat": flat}, str(out / f"block_{i:05d}.safetensors"), metadata={"plait": "zo2-block"})
        del flat
        blk.to("meta")
        if progress is not None:
            progress(i + 1, len(blocks))
    manifest = {"format": 1, "arch": arch, "size": size, "config": config, "storage_dtype": storage_dtype,
                "block_path": block_path, "blocks": len(blocks), "numel": numels, "seed": seed}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"'{path}' is not a sharded model directory: {MANIFEST} is missing "
                                f"(write one with scripts/make_shards.py)")
    return json.loads(f.read_text())


def load_sharded_model(path: str | Path):
    """(model, tokenizer): resident parameters in memory, block parameters mapped read-only, copy-on-write."""
    path = Path(path)
    man = read_manifest(path)
    dtype = STORAGE_DTYPES[man["storage_dtype"]]
    model, tokenizer = _build(man["arch"], man["size"], man["config"], layers=0)
    load_model(model, str(path / "resident.safetensors"))
    full, block_path, blocks = _meta_blocks(man["arch"], man["size"], man["config"])
    if len(blocks) != man["blocks"]:
        raise ValueError(f"'{path}': manifest lists {man['blocks']} blocks, the model config has {len(blocks)}")
    for i, blk in enumerate(blocks):
        slots = [(sub, attr, p) for sub in blk.modules() for attr, p in sub._parameters.items() if p is not None]
        numel = sum(p.numel() for _, _, p in slots)
        flat, _ = map_flat(path / f"block_{i:05d}.safetensors", dtype, numel)  # the views keep the mapping
        offset = 0
        for sub, attr, p in slots:
            view = flat[offset:offset + p.numel()].view(p.shape)
            sub._parameters[attr] = torch.nn.Parameter(view, requires_grad=p.requires_grad)
            offset += p.numel()
    _set_blocks(model, block_path, blocks)
    for sub in model.modules():  # the resident part was built with 0 layers: give every module the full config
        if getattr(sub, "config", None) is not None:
            sub.config = full.config
    model._plait_shard_dir = str(path)
    return model.eval(), tokenizer
