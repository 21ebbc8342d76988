"""ZO2 engine vs the plain in-place MeZO step: bit-for-bit equality, placement invariance, counts, RNG, maths.

The reference for equality is `InPlaceMeZO` (MeZO's own in-place loop); for the maths it is autograd in fp64.
"""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.zo2.fused import ZO2Engine
from plait.plugins.zo2.mezo import InPlaceMeZO, MeZO, lm_loss, param_table, step_seed
from tests.plugins.zo2._batch import lm_batch

CPU = torch.device("cpu")


def mezo(**kw) -> MeZO:
    args = dict(eps=1e-3, lr=1e-3, weight_decay=0.1, distribution="gaussian", q=1, one_sided=False,
                no_decay=["bias", "norm", "ln_", "layernorm"], schedule="constant", warmup_steps=0)
    args.update(kw)
    return MeZO(**args)


def zo2(model, m, **kw) -> ZO2Engine:
    args = dict(blocks=None, overlap=True, bucket=True, storage_dtype="fp32", pin_memory=False, disk_dir=None)
    args.update(kw)
    return ZO2Engine(model, CPU, m, **args)


def tiny(arch="opt", layers=2, dtype="float32", seed=0):
    torch.manual_seed(seed)
    model, _ = build_causal_lm(arch=arch, size="tiny", config={"num_hidden_layers": layers}, dtype=dtype)
    return model.eval()


def batch(seed=0, b=4, t=12):
    return lm_batch(seed, 4, 1000, (b, t), pad=(0, 3), prompt=t // 2)  # some right padding


def run_pair(ref, eng, steps, lr=1e-3):
    for t in range(steps):
        b = batch(seed=t)
        la, ga = ref.step(b, step_seed(0, t), lr)
        lb, gb = eng.step(b, step_seed(0, t), lr)
        assert la == lb and ga == gb, f"step {t}: {la} {lb} {ga} {gb}"
    return ref.state_dict(), eng.state_dict()


def assert_same(sa, sb):
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", ["opt", "qwen3", "llama"])
def test_offloaded_step_equals_plain_mezo_bit_for_bit(arch):
    model = tiny(arch)
    ref = InPlaceMeZO(copy.deepcopy(model), CPU, mezo())
    eng = zo2(model, mezo())
    sa, sb = run_pair(ref, eng, 20)
    assert_same(sa, sb)
    eng.close()


@pytest.mark.parametrize("placement", [dict(), dict(overlap=False, bucket=False)])
def test_exact_in_fp64_with_every_block_streamed(placement):
    model = tiny("opt", dtype="float64")
    ref = InPlaceMeZO(copy.deepcopy(model), CPU, mezo())
    eng = zo2(model, mezo(), storage_dtype="model", **placement)  # host copies in fp64, the model's dtype
    assert all(p.dtype == torch.float64 for p in model.model.decoder.layers.parameters())
    sa, sb = run_pair(ref, eng, 5)
    assert_same(sa, sb)
    eng.close()


class _RoundingMeZO(MeZO):
    """The plain MeZO step with the streamed blocks' parameters rounded to fp16 where ZO2 stores them: after
    each step's shifts (the write-back) and after each update (the lazy update, rounded at once)."""

    def __init__(self, rounded: set[int], **kw):
        super().__init__(**kw)
        self.rounded = rounded

    def update(self, p, seed, grads, lr):
        if p.index not in self.rounded:
            return super().update(p, seed, grads, lr)
        t = p.tensor.data
        t.copy_(t.half())
        super().update(p, seed, grads, lr)
        t.copy_(t.half())


@pytest.mark.parametrize("flush_every", [1, 2, 0])
def test_fp16_storage_equals_rounded_mezo_whatever_the_flushes(flush_every):
    """With fp16 host copies the trajectory must not depend on when flush() runs (every eval and checkpoint):
    the lazily updated block is rounded to its storage dtype before the forward uses it."""
    model = tiny("opt", layers=3)
    kw = dict(eps=1e-3, lr=1e-2, weight_decay=0.1, distribution="gaussian", q=1, one_sided=False,
              no_decay=["bias", "norm", "ln_", "layernorm"], schedule="constant", warmup_steps=0)
    rounded = {p.index for p in param_table(model, []) if ".layers." in p.name}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".layers." in name:
                p.copy_(p.half())  # the host copies start rounded
    # the reference rounds between the restore and the update (ZO2's write-back), so they stay two passes
    ref = InPlaceMeZO(reference, CPU, _RoundingMeZO(rounded, **kw), fold_restore=False)
    eng = zo2(model, MeZO(**kw), storage_dtype="fp16")
    for t in range(5):
        b = batch(seed=t)
        assert ref.step(b, step_seed(0, t), 1e-2) == eng.step(b, step_seed(0, t), 1e-2), t
        if flush_every and t % flush_every == 0:
            eng.flush()
    assert_same(ref.state_dict(), eng.state_dict())
    eng.close()


@pytest.mark.parametrize("variant", [dict(q=3), dict(one_sided=True), dict(one_sided=True, q=2),
                                     dict(distribution="rademacher"), dict(weight_decay=0.0)])
def test_estimator_variants_match_plain(variant):
    model = tiny("opt")
    ref = InPlaceMeZO(copy.deepcopy(model), CPU, mezo(**variant))
    eng = zo2(model, mezo(**variant))
    assert_same(*run_pair(ref, eng, 4))


@pytest.mark.parametrize("placement", [
    dict(blocks=None), dict(blocks=[1, 2]), dict(blocks=[]), dict(overlap=False), dict(bucket=False),
    dict(overlap=False, bucket=False), dict(disk_dir="DISK"),
])
def test_placement_invariance(placement, tmp_path):
    if placement.get("disk_dir") == "DISK":
        placement = dict(placement, disk_dir=str(tmp_path))
    model = tiny("qwen3", layers=4)
    ref = InPlaceMeZO(copy.deepcopy(model), CPU, mezo())
    eng = zo2(model, mezo(), **placement)
    assert_same(*run_pair(ref, eng, 6))
    if "disk_dir" in placement:
        assert len(list(tmp_path.glob("block_*.safetensors"))) == 4


def _leaf_counts(model):
    counts = {}
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            counts[name] = 0
            m.register_forward_pre_hook(lambda mod, args, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


def test_counts_forwards_transfers_residency_and_draws():
    model = tiny("opt", layers=6)
    counts = _leaf_counts(model)
    m = mezo()
    eng = zo2(model, m)
    unique = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() de-duplicates ties
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # OPT ties them: a real test of dedup
    block_bytes = sum(p.numel() * 4 for p in model.model.decoder.layers.parameters())
    for t in range(3):
        m.draws = 0
        eng.step(batch(seed=t), step_seed(0, t), 1e-3)
        # perturbation draws once per unique element; from step 2 on, the lazy update draws as many again
        assert m.draws == unique * (1 if t == 0 else 2)
        assert set(counts.values()) == {2}, counts  # 2 forwards per parametric module per train step
        counts.update({k: 0 for k in counts})
        s = eng.stats
        assert s.per_block == {b: [1, 1] for b in range(6)}  # one upload and one offload per block per step
        assert s.max_resident <= 3
        assert s.bytes_up == block_bytes and s.bytes_down == block_bytes
    eng.stats.reset()
    eng.flush()  # the pending update streams every block through the device once more, with the same bound
    assert eng.stats.max_resident <= 3
    assert eng.stats.per_block == {b: [1, 1] for b in range(6)} and eng.stats.bytes_down == block_bytes
    eng.logits(batch())
    assert set(counts.values()) == {1}  # 1 forward per module per eval step
    assert eng.stats.bytes_down == 0  # eval writes nothing back
    eng.close()


def test_fp16_storage_halves_bytes():
    model = tiny("opt", layers=3)
    eng = zo2(model, mezo(), storage_dtype="fp16")
    eng.step(batch(), step_seed(0, 0), 1e-3)
    block_params = sum(p.numel() for p in model.model.decoder.layers.parameters())
    assert eng.stats.bytes_up == 2 * block_params and eng.stats.bytes_down == 2 * block_params
    assert all(p.dtype == torch.float16 for p in model.model.decoder.layers.parameters())  # host copies
    eng.close()


def test_overlap_off_keeps_one_block_resident():
    model = tiny("llama", layers=4)
    eng = zo2(model, mezo(), overlap=False)
    eng.step(batch(), step_seed(0, 0), 1e-3)
    assert eng.stats.max_resident <= 2  # the block computing and the next one prefetched
    eng.close()


def test_delayed_update_and_flush():
    model = tiny("opt")
    ref = InPlaceMeZO(copy.deepcopy(model), CPU, mezo())
    before = copy.deepcopy(model.state_dict())
    eng = zo2(model, mezo(), blocks=[])  # nothing streamed: parameters readable in place
    b = batch()
    ref.step(b, step_seed(0, 0), 1e-3)
    eng.step(b, step_seed(0, 0), 1e-3)
    # before flush the engine holds θ_0 plus MeZO's restore drift (no update yet); the reference has θ_1
    live = model.state_dict()
    assert not all(torch.equal(live[k], ref.state_dict()[k]) for k in live)
    assert max((live[k] - before[k]).abs().max().item() for k in live) < 1e-6
    eng.flush()
    assert_same(ref.state_dict(), model.state_dict())


def _flat_z(m: MeZO, params, seed):
    return torch.cat([m.z(p.tensor.data, p.index, seed, 0).reshape(-1) for p in params])


def test_projected_gradient_is_directional_derivative_fp64():
    """g = (f(θ+εz) - f(θ-εz)) / 2ε = z·∇f + O(ε²): the error falls 4x when ε halves.

    Qwen3 (SiLU) is smooth; OPT's ReLU kinks make the finite difference differ from the gradient by O(1).
    ε stays ≥ 5e-4: HF's eager attention runs its softmax in fp32 even for fp64 models, a noise floor
    that dominates the O(ε²) term below ~1e-4.
    """
    model = tiny("qwen3", dtype="float64")
    b = batch()
    params = param_table(model, [])
    model.zero_grad()
    lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).backward()
    grad = torch.cat([p.tensor.grad.reshape(-1) for p in params])
    errors = []
    for eps in (1e-3, 5e-4):
        m = mezo(eps=eps, lr=1e-30)
        z = _flat_z(m, params, seed=7)
        eng = InPlaceMeZO(copy.deepcopy(model), CPU, m)
        _, (g,) = eng.step(b, 7, 1e-30)
        errors.append(abs(g - float(z @ grad)))
        assert abs(g - float(z @ grad)) < 2e-2 * abs(float(z @ grad))
    assert 3.0 < errors[0] / errors[1] < 5.0


def test_update_descends_sign_test_fp64():
    model = tiny("opt", dtype="float64")
    b = batch()

    def loss(mod):
        with torch.no_grad():
            return float(lm_loss(mod(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]))

    f0 = loss(model)
    for seed in range(8):
        eng = zo2(copy.deepcopy(model), mezo(weight_decay=0.0, lr=1e-5))
        _, (g,) = eng.step(b, seed, 1e-5)
        eng.flush()
        assert g != 0 and loss(eng.model) < f0  # p -= lr g z decreases f to first order by lr g²


def test_weight_decay_exclusions():
    model = tiny("qwen3")
    table = {p.name: p.decay for p in param_table(model, ["bias", "norm", "ln_", "layernorm"])}
    assert not any(d for n, d in table.items() if "norm" in n)
    assert table["model.layers.0.self_attn.q_proj.weight"] and table["model.embed_tokens.weight"]


def test_non_finite_gradient_skips_the_update():
    m = mezo()
    p = param_table(torch.nn.Linear(3, 2), [])[0]
    before = p.tensor.detach().clone()
    m.update(p, 0, [float("nan")], 1.0)
    assert torch.equal(p.tensor.detach(), before)
    m.update(p, 0, [1.0], 1.0)
    assert not torch.equal(p.tensor.detach(), before)


def test_unstreamable_model_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="cannot stream Sequential"):
        zo2(model, mezo())


def test_bad_offload_options():
    with pytest.raises(ValueError, match="storage_dtype .fp8. is not supported; allowed: model, fp32"):
        zo2(tiny(), mezo(), storage_dtype="fp8")
    with pytest.raises(ValueError, match="block 7 does not exist"):
        zo2(tiny(), mezo(), blocks=[7])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zo2(tiny(), mezo(), disk_dir="/nonexistent/plait-disk")
    with pytest.raises(ValueError, match="eps must be > 0"):
        mezo(eps=0.0)


def test_sharded_directory_streams_like_the_in_memory_model(tmp_path):
    """A model written block by block and loaded with memory-mapped blocks trains exactly like the same
    model held in memory (the plain MeZO reference)."""
    from plait.plugins.zo2.shards import load_sharded_model, write_sharded_model

    write_sharded_model(tmp_path, "llama", "tiny", {"num_hidden_layers": 3}, storage_dtype="fp32", seed=3)
    model, _ = load_sharded_model(tmp_path)
    in_memory = copy.deepcopy(model)  # materialises the mapped blocks
    assert not any(p.is_meta for p in in_memory.parameters())
    ref = InPlaceMeZO(in_memory, CPU, mezo())
    counts = _leaf_counts(model)
    source = _digests(tmp_path)
    with pytest.raises(ValueError, match="working copy"):
        zo2(model, mezo())  # the source shards are never trained in place: a working directory is needed
    with pytest.raises(ValueError, match="the model's own shard directory"):
        zo2(model, mezo(), disk_dir=str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    eng = zo2(model, mezo(), storage_dtype="model", disk_dir=str(work))  # model: the shards' fp32
    assert_same(*run_pair(ref, eng, 3))
    assert set(counts.values()) == {6}  # every module, blocks included, ran 2 forwards in each of 3 steps
    eng.close()
    assert _digests(tmp_path) == source  # the source model is untouched
    live = ref.state_dict()
    for i in range(3):  # the working copy holds the trained blocks
        flat = load_file(str(work / f"block_{i:05d}.safetensors"))["flat"]
        names = [k for k in live if k.startswith(f"model.layers.{i}.")]
        assert torch.equal(flat, torch.cat([live[k].reshape(-1) for k in names])), i


def _digests(path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def test_disk_dir_is_rewritten_from_the_model(tmp_path):
    """An existing disk_dir (a previous run's trained shards) is a scratch area, never a starting point."""
    model = tiny("qwen3", layers=3)
    start = copy.deepcopy(model.state_dict())
    first = zo2(copy.deepcopy(model), mezo(), disk_dir=str(tmp_path))
    for t in range(2):
        first.step(batch(seed=t), step_seed(0, t), 1e-2)
    first.close()
    second = zo2(model, mezo(), disk_dir=str(tmp_path))
    assert_same(start, second.state_dict())
    second.close()


def test_missing_manifest_is_a_clear_error(tmp_path):
    from plait.plugins.zo2.shards import load_sharded_model

    with pytest.raises(FileNotFoundError, match="not a sharded model directory"):
        load_sharded_model(tmp_path)


def test_disk_dir_gives_each_rank_its_own_shards(tmp_path, monkeypatch):
    # ranks of a distributed run share one run directory: each must write and map its own shard files
    from plait.plugins.zo2 import build_zo2

    args = dict(blocks=None, overlap=False, bucket=True, storage_dtype="fp32", pin_memory=False, disk_dir="run")
    build_zo2(tiny(), CPU, mezo(), run_dir=str(tmp_path), **args).close()
    assert len(list((tmp_path / "block_shards").glob("block_*.safetensors"))) == 2
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        build_zo2(tiny(), CPU, mezo(), run_dir=str(tmp_path), **args).close()
        assert len(list((tmp_path / "block_shards" / f"rank{rank}").glob("block_*.safetensors"))) == 2
        build_zo2(tiny(), CPU, mezo(), run_dir=None, **dict(args, disk_dir=str(tmp_path))).close()  # explicit
        assert len(list((tmp_path / f"rank{rank}").glob("block_*.safetensors"))) == 2
