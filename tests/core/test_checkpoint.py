"""Checkpoints: round trip without pickle, atomic writes, corruption detection, RNG state."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from plait.checkpoint import Checkpointer, pack, rng_state, set_rng_state, unpack
from plait.errors import CheckpointError, RunWriteError


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
    with pytest.raises(CheckpointError, match="corrupted"):
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
    with pytest.raises(RunWriteError, match="cannot write checkpoint .*step_00000002.*disk full"):
        ck.save(2, {"x": torch.ones(2)})
    assert ck.latest().name == "step_00000001"  # the half-written step 2 is not taken for complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the temporary folder is gone


def test_rng_state_round_trip():
    state = rng_state()
    json.dumps(pack(state, {}))
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(unpack(json.loads(json.dumps(pack(state, t := {}))), t))
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_cuda_rng_state_is_the_run_devices_and_old_all_device_states_fit_fewer_gpus(monkeypatch):
    # emulated CUDA: a checkpoint from an 8-GPU node must resume where one GPU is visible (it raised IndexError)
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.setdefault("one", s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.setdefault("all", list(states)))
    state = rng_state()
    assert torch.equal(state["cuda"]["state"], torch.tensor([7], dtype=torch.uint8))
    set_rng_state(state)
    assert torch.equal(calls["one"], torch.tensor([7], dtype=torch.uint8))
    old = dict(state, cuda=[torch.tensor([i], dtype=torch.uint8) for i in range(8)])
    set_rng_state(old)
    assert [int(t) for t in calls["all"]] == [0]


def test_a_cuda_index_beyond_the_visible_devices_is_one_line(monkeypatch):
    from plait.errors import ConfigError
    from plait.run import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    with pytest.raises(ConfigError, match=r"run.device: 'cuda:3' but this machine shows 2 CUDA device\(s\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1") and current == ["cuda:1"]


def _rewrite_state(path, edit):
    """Edit state.json as a user would, keeping the old manifest (which no longer matches)."""
    meta = json.loads((path / "state.json").read_text())
    edit(meta)
    (path / "state.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [
    lambda m: m.update(step=0),
    lambda m: m["state"].update({"s:loop": {"s:first_eval": 1.0}}),
    lambda m: m.update(format=99),
])
def test_an_edited_state_file_is_refused_by_the_manifest(tmp_path, edit):
    # before the manifest only the tensors were hashed: an edited step or first_eval was accepted silently
    path = Checkpointer(tmp_path).save(1, _state())
    Checkpointer.load(path)
    _rewrite_state(path, edit)
    with pytest.raises(CheckpointError, match="corrupted: SHA-256"):
        Checkpointer.load(path)


def _without_manifest(path, edit):
    (path / "MANIFEST.json").unlink(missing_ok=True)
    meta = json.loads((path / "state.json").read_text())
    meta["format"] = 1
    meta["sha256"] = hashlib.sha256((path / "tensors.safetensors").read_bytes()).hexdigest()
    edit(meta)
    (path / "state.json").write_text(json.dumps(meta))


def test_a_format_1_checkpoint_still_loads(tmp_path):
    path = Checkpointer(tmp_path).save(3, _state())
    _, want = Checkpointer.load(path)
    _without_manifest(path, lambda m: None)
    step, got = Checkpointer.load(path)
    assert step == 3 and _equal(got, want)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(step=2), "does not match the folder name"),
    (lambda m: m.update(step="3"), "not an integer"),
    (lambda m: m.update(step=-3), "not an integer >= 0"),
    (lambda m: m.update(format=99), "format 99"),
    (lambda m: m.update(format=True), "format True"),
    (lambda m: m.update(state=[1]), "not a mapping"),
    (lambda m: m["state"].update({"s:w": {"__tensor__": "nope"}}), "lacks"),
    (lambda m: m["state"].update({"x:w": 1}), "malformed"),
    (lambda m: m["state"].update({"i:w": 1}), "not an integer key"),
])
def test_every_field_of_state_json_is_validated(tmp_path, edit, match):
    # the manifest-free (format 1) path must still check each field: a KeyError/TypeError traceback before
    path = Checkpointer(tmp_path).save(3, _state())
    _without_manifest(path, edit)
    with pytest.raises(CheckpointError, match=match):
        Checkpointer.load(path)


def test_deep_nesting_is_one_error_not_a_recursion_traceback(tmp_path):
    path = Checkpointer(tmp_path).save(3, _state())
    deep = "[" * 200_000 + "]" * 200_000
    (path / "MANIFEST.json").unlink(missing_ok=True)
    s = json.dumps({"format": 1, "step": 3, "sha256": "x", "state": {"s:a": 0}})
    (path / "state.json").write_text(s.replace('{"s:a": 0}', deep))
    with pytest.raises(CheckpointError, match="corrupted|not a mapping"):
        Checkpointer.load(path)
    nested = {"s:a": 0}
    for _ in range(100):
        nested = {"s:a": nested}
    path = Checkpointer(tmp_path).save(4, _state())
    _without_manifest(path, lambda m: m.update(state=nested))
    with pytest.raises(CheckpointError, match="deeper than"):
        Checkpointer.load(path)


def test_an_unlisted_file_in_a_checkpoint_is_refused(tmp_path):
    path = Checkpointer(tmp_path).save(1, _state())
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list"):
        Checkpointer.load(path)
