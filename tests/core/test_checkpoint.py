"""Checkpoints: round trip without pickle, atomic writes, corruption detection, RNG state."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from plait.checkpoint import Checkpointer, pack, rng_state, set_rng_state, unpack
from plait.errors import CheckpointError


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3, "name": "x",
            "nested": {1: (1.5, None, True), "list": [torch.arange(3), "s"]}}


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_pack_unpack_round_trip_is_exact():
    state = _state()
    tensors = {}
    body = pack(state, tensors)
    json.dumps(body)  # the non-tensor part is plain JSON
    assert _equal(unpack(json.loads(json.dumps(body)), tensors), state)


def test_pack_refuses_objects_that_need_pickle():
    with pytest.raises(TypeError, match="without pickle"):
        pack({"f": object()}, {})


def test_save_load_round_trip_and_keep(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    state = _state()
    for step in (1, 2, 3):
        ck.save(step, state)
    assert [p.name for p in ck.complete()] == ["step_00000002", "step_00000003"]
    step, loaded = Checkpointer.load(ck.latest())
    assert step == 3 and _equal(loaded, state)
    # the restored optimizer state drives an identical next step
    m1, m2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    m1.load_state_dict(state["model"]); m2.load_state_dict(loaded["model"])
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=0.1), torch.optim.AdamW(m2.parameters(), lr=0.1)
    o1.load_state_dict(state["optimizer"]); o2.load_state_dict(loaded["optimizer"])
    x = torch.randn(5, 3)
    for m, o in ((m1, o1), (m2, o2)):
        m(x).pow(2).sum().backward(); o.step()
    assert torch.equal(m1.weight, m2.weight)


def test_tied_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    ck = Checkpointer(tmp_path)
    ck.save(1, {"a": w, "b": w, "view": w[1]})
    _, loaded = Checkpointer.load(ck.latest())
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w) and torch.equal(loaded["view"], w[1])


def test_corrupted_tensor_file_is_refused(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, _state())
    f = path / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: SHA-256"):
        Checkpointer.load(path)


def test_truncated_state_file_is_refused(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, _state())
    s = (path / "state.json").read_text()
    (path / "state.json").write_text(s[: len(s) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        Checkpointer.load(path)


def test_truncated_tensor_file_is_refused(tmp_path):
    ck = Checkpointer(tmp_path)
    path = ck.save(1, _state())
    f = path / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        Checkpointer.load(path)


def test_interrupted_write_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path)
    ck.save(1, {"x": torch.ones(2)})
    import plait.checkpoint as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod.json, "dump", boom)
    with pytest.raises(OSError):
        ck.save(2, {"x": torch.ones(2)})
    assert ck.latest().name == "step_00000001"  # the half-written step 2 is not taken for complete


def test_rng_state_round_trip():
    state = rng_state()
    json.dumps(pack(state, {}))
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(unpack(json.loads(json.dumps(pack(state, t := {}))), t))
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
