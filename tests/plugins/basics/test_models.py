"""Tests of the causal-LM builder and ``find_blocks``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.plugins.basics.models import SIZE_PRESETS, build_causal_lm, find_blocks
from plait.plugins.basics.tokenizer import load_tokenizer

ARCHS = ["opt", "qwen3", "llama", "gpt2"]
VOCAB = 1024  # the bundled tokenizer


def expected_params(arch: str, cfg: dict, vocab: int = VOCAB) -> int:
    """Parameter count of a model with this preset, from the architecture on paper."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    if arch == "gpt2":
        ffn = cfg["n_inner"]
        embeddings = vocab * h + cfg["max_position_embeddings"] * h
        attention = h * 3 * h + 3 * h + h * h + h  # c_attn (q, k, v fused) and c_proj, Conv1D with biases
        mlp = h * ffn + ffn + ffn * h + h
        norms = 2 * 2 * h
        return embeddings + layers * (attention + mlp + norms) + 2 * h  # ln_f; lm_head tied to wte
    if arch == "opt":
        ffn = cfg["ffn_dim"]
        embeddings = vocab * h + (cfg["max_position_embeddings"] + 2) * h  # OPT offsets positions by 2
        attention = 4 * (h * h + h)  # q, k, v, out with biases
        mlp = h * ffn + ffn + ffn * h + h
        norms = 2 * 2 * h  # two LayerNorms (weight + bias)
        return embeddings + layers * (attention + mlp + norms) + 2 * h  # final LayerNorm; lm_head tied
    head_dim = cfg.get("head_dim", h // heads)
    kv = cfg["num_key_value_heads"]
    attention = h * heads * head_dim * 2 + 2 * h * kv * head_dim  # q, o; k, v (no biases)
    mlp = 3 * h * cfg["intermediate_size"]  # gate, up, down
    norms = 2 * h + (2 * head_dim if arch == "qwen3" else 0)  # + Qwen3's q_norm / k_norm
    return vocab * h + layers * (attention + mlp + norms) + h + vocab * h  # untied lm_head


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tokenizer), (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    ids[1, 9:] = tokenizer.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_builds_and_trains(arch, tokenizer):
    torch.manual_seed(0)
    model, tok = build_causal_lm(arch, "tiny", tokenizer=tokenizer)
    assert tok is tokenizer
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert cfg.max_position_embeddings == 512
    assert n_params(model) == expected_params(arch, SIZE_PRESETS[arch]["tiny"])

    out = model(**batch(tokenizer))
    assert out.logits.shape == (2, 12, len(tokenizer))
    assert torch.isfinite(out.loss)
    # A fresh model predicts roughly uniformly: loss near log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_is_deterministic_under_seed(arch, tokenizer):
    torch.manual_seed(123)
    a, _ = build_causal_lm(arch, "tiny", tokenizer=tokenizer)
    torch.manual_seed(123)
    b, _ = build_causal_lm(arch, "tiny", tokenizer=tokenizer)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_default_tokenizer_is_the_bundled_one():
    model, tok = build_causal_lm("opt", "tiny")
    assert len(tok) == VOCAB and model.config.vocab_size == VOCAB


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_gives_identical_logits(arch, tokenizer, tmp_path):
    torch.manual_seed(0)
    model, _ = build_causal_lm(arch, "tiny", tokenizer=tokenizer)
    model.eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reloaded, tok = build_causal_lm(path=str(tmp_path))
    reloaded.eval()
    assert type(reloaded) is type(model)
    assert len(tok) == len(tokenizer) and tok.pad_token_id == tokenizer.pad_token_id
    inputs = batch(tokenizer, seed=1)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_reload_without_saved_tokenizer_uses_bundled(tokenizer, tmp_path):
    model, _ = build_causal_lm("llama", "tiny", tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    _, tok = build_causal_lm(path=tmp_path)
    assert len(tok) == VOCAB and tok.eos_token_id == 2


def test_config_overrides_and_tying(tokenizer):
    model, _ = build_causal_lm("qwen3", "tiny", config={"num_hidden_layers": 3}, tokenizer=tokenizer,
                               tie_word_embeddings=True)
    assert model.config.num_hidden_layers == 3
    assert len(find_blocks(model)[1]) == 3
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    untied, _ = build_causal_lm("opt", "tiny", tokenizer=tokenizer, tie_word_embeddings=False)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_width_override_keeps_derived_fields_consistent(arch, tokenizer):
    model, _ = build_causal_lm(arch, "tiny", config={"hidden_size": 96, "num_attention_heads": 6},
                               tokenizer=tokenizer)
    if arch == "opt":
        assert model.config.word_embed_proj_dim == 96
    if arch == "qwen3":
        assert model.config.head_dim == 16
    out = model(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape == (1, 3, VOCAB)


def test_dtype(tokenizer):
    model, _ = build_causal_lm("llama", "tiny", tokenizer=tokenizer, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs,fragment", [
    ({"arch": "gpt9"}, "gpt9"),
    ({"arch": "opt", "size": "huge"}, "huge"),
    ({"config": {"hidden_sise": 32}}, "hidden_sise"),
    ({"dtype": "float8"}, "float8"),
])
def test_bad_arguments_are_named(kwargs, fragment, tokenizer):
    with pytest.raises(ValueError, match=fragment) as info:
        build_causal_lm(tokenizer=tokenizer, **kwargs)
    if "arch" in kwargs and kwargs["arch"] == "gpt9":
        assert "opt" in str(info.value) and "qwen3" in str(info.value)  # lists what is allowed
    if kwargs.get("size") == "huge":
        assert "tiny" in str(info.value)


def test_path_rejects_preset_options(tokenizer, tmp_path):
    model, _ = build_causal_lm("opt", "tiny", tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_causal_lm(path=tmp_path, config={"num_hidden_layers": 1})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        build_causal_lm(path=tmp_path, tie_word_embeddings=False)
    build_causal_lm(path=tmp_path, config={})  # an empty override is fine


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-model-here"):
        build_causal_lm(path=str(tmp_path / "no-model-here"))


def test_tokenizer_larger_than_embedding_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="embedding"):
        build_causal_lm("opt", "tiny", config={"vocab_size": 100}, tokenizer=tokenizer)


@pytest.mark.parametrize("arch,name", [("opt", "model.decoder.layers"), ("qwen3", "model.layers"), ("llama", "model.layers")])
def test_find_blocks(arch, name, tokenizer):
    model, _ = build_causal_lm(arch, "tiny", tokenizer=tokenizer)
    found, blocks = find_blocks(model)
    assert found == name
    assert blocks is model.get_submodule(name)
    assert len(blocks) == SIZE_PRESETS[arch]["tiny"]["num_hidden_layers"]


def test_find_blocks_generic_and_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 2), nn.ReLU()])  # mixed classes: not blocks
            self.small = nn.ModuleList([nn.Linear(8, 1) for _ in range(5)])  # fewer parameters
            self.trunk = nn.Sequential(nn.Identity(), nn.ModuleList([Block() for _ in range(3)]))

    name, blocks = find_blocks(Net())
    assert name == "trunk.1" and len(blocks) == 3

    with pytest.raises(ValueError, match="Sequential.*ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_size_presets_shape():
    assert set(SIZE_PRESETS) == set(ARCHS)
    for arch in ARCHS:
        assert set(SIZE_PRESETS[arch]) == {"tiny", "small", "100m"}
        tiny, small = SIZE_PRESETS[arch]["tiny"], SIZE_PRESETS[arch]["small"]
        assert (tiny["hidden_size"], tiny["num_hidden_layers"], tiny["num_attention_heads"]) == (64, 2, 4)
        assert (small["hidden_size"], small["num_hidden_layers"], small["num_attention_heads"]) == (256, 4, 4)
        for preset in SIZE_PRESETS[arch].values():
            if arch == "opt":
                assert preset["word_embed_proj_dim"] == preset["hidden_size"]
            elif arch != "gpt2":
                assert preset["num_attention_heads"] % preset["num_key_value_heads"] == 0
            if arch == "qwen3":
                assert preset["head_dim"] * preset["num_attention_heads"] == preset["hidden_size"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", ["small", "100m"])
def test_larger_presets_parameter_counts(arch, size, tokenizer):
    # Built on the meta device: shapes only, no memory or init time.
    with torch.device("meta"):
        model, _ = build_causal_lm(arch, size, tokenizer=tokenizer)
    count = n_params(model)
    assert count == expected_params(arch, SIZE_PRESETS[arch][size])
    if size == "100m":
        assert 80e6 <= count <= 130e6


# --- the bundled pretrained base (scripts/build_base_model.py) -----------------------------------------
def test_bundled_base_loads_offline(monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tok = build_causal_lm(path="bundled:tiny-opt-base")
    assert model.config.model_type == "opt"
    assert len(tok) == len(tokenizer) == model.config.vocab_size
    assert tok.get_vocab() == tokenizer.get_vocab()  # saved with the bundled tokenizer
    assert n_params(model) == expected_params("opt", SIZE_PRESETS["opt"]["tiny"])
    model.eval()
    with torch.no_grad():
        out = model(**batch(tok))
    assert out.logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)


def test_bundled_base_is_pretrained(tokenizer):
    # Pretrained on English text: natural text is far likelier than under a fresh model (loss ~ log(1024) = 6.9).
    model, tok = build_causal_lm(path="bundled:tiny-opt-base")
    model.eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("The acting was wonderful and the plot was clever.",
                                                 add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0


def test_bundled_base_equals_a_reload(tmp_path):
    a, tok = build_causal_lm(path="bundled:tiny-opt-base")
    b, _ = build_causal_lm(path="bundled:tiny-opt-base")
    a.eval(), b.eval()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    a.save_pretrained(tmp_path)
    c, _ = build_causal_lm(path=tmp_path, tokenizer=tok)
    c.eval()
    x = batch(tok, seed=3)
    with torch.no_grad():
        la = a(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        lb = b(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        lc = c(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert torch.equal(la, lb)
    assert torch.equal(la, lc)


def test_unknown_bundled_model_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown bundled model 'nope'.*bundled:tiny-opt-base"):
        build_causal_lm(path="bundled:nope")
