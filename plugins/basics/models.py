"""Hugging Face causal-LM builder for the basics plugins.

``build_causal_lm`` either builds a freshly initialised OPT / Qwen3 / LLaMA
model from a size preset (``SIZE_PRESETS``, overridable key by key), sized to
the tokenizer's vocabulary, or loads a saved model from a local directory.
Nothing is ever downloaded.  ``find_blocks`` locates the list of transformer
blocks, which methods such as activation checkpointing or per-layer
optimisation work on.

``path="bundled:<name>"`` loads a model shipped in ``assets/`` (``BUNDLED_MODELS``):
``bundled:tiny-opt-base`` is a tiny OPT pretrained on a generated English and
movie-review corpus by ``scripts/build_base_model.py`` (tests use it);
``bundled:tiny-opt-sentiment`` is the base the zeroth-order quick start
fine-tunes: a tiny OPT with a prior for the sentiment task, pretrained by
``scripts/build_prior_model.py`` (its ``build.json`` records how).

The models themselves are the ``transformers`` implementations; only their
configurations are chosen here.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen3Config

from .tokenizer import ASSETS, load_tokenizer

CONFIG_CLASSES = {"opt": OPTConfig, "qwen3": Qwen3Config, "llama": LlamaConfig, "gpt2": GPT2Config}
ARCHS = tuple(CONFIG_CLASSES)
SIZES = ("tiny", "small", "100m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Shape of each size, shared by the archs:
#   tiny:  fast CPU tests; small: quick CPU/GPU runs;
#   100m:  ~90M parameters (OPT-125m shape without its 50k vocabulary), for benchmarks.
# Gated-MLP archs (qwen3, llama) get a larger intermediate size at 100m so
# they land near the same parameter count as OPT with its 4x ReLU MLP.
_SHAPES = {
    # size: (hidden, layers, heads, kv_heads, ffn (opt), intermediate (gated), max_positions)
    "tiny": (64, 2, 4, 2, 128, 128, 512),
    "small": (256, 4, 4, 2, 688, 688, 512),
    "100m": (768, 12, 12, 4, 3072, 2560, 2048),
}


# Models shipped with the plugin: name -> directory (save_pretrained layout).
BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {
    "tiny-opt-base": ASSETS / "tiny-opt-base",  # built by scripts/build_base_model.py
    "tiny-opt-sentiment": ASSETS / "tiny-opt-sentiment",  # built by scripts/build_prior_model.py
}


def check_hf_causal_lm(*, arch: str = "opt", size: str = "tiny", path=None, config=None, tie_word_embeddings=None,
                       **_: object) -> None:
    """What ``build_hf_causal_lm`` refuses, checked at validate without building or loading anything."""
    if path is not None:
        directory = resolve_model_path(path)
        if not directory.exists():
            raise FileNotFoundError(f"model path does not exist: {directory}")
        if config:
            raise ValueError(f"config overrides {sorted(config)} cannot be applied when loading a saved model from "
                             f"{directory}; edit its config.json or build from a preset (path=None) instead")
        if tie_word_embeddings is not None:
            raise ValueError(f"tie_word_embeddings cannot be changed when loading a saved model from {directory}; "
                             "it keeps the tying in its config.json")
        return
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if size not in SIZE_PRESETS[arch]:
        raise ValueError(f"unknown size {size!r} for arch {arch!r}; allowed: {', '.join(SIZE_PRESETS[arch])}")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``"bundled:<name>"`` -> that bundled model's directory; any other path unchanged (as a Path)."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(BUNDLED_PREFIX):
        name = text[len(BUNDLED_PREFIX):]
        if name not in BUNDLED_MODELS:
            raise ValueError(
                f"unknown bundled model {name!r} in path {text!r}; bundled models: "
                + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS)
            )
        directory = BUNDLED_MODELS[name]
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"bundled model {text!r} is missing from {directory}; rebuild it with "
                "`python scripts/build_base_model.py`"
            )
        return directory
    return Path(text)


def _preset(arch: str, size: str) -> dict:
    hidden, layers, heads, kv_heads, ffn, intermediate, positions = _SHAPES[size]
    common = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": positions,
    }
    if arch == "gpt2":
        # GPT-2 (HF Conv1D layers); GPT2Config maps hidden_size etc. to n_embd, n_layer, n_head, n_positions
        return {**common, "n_inner": ffn}
    if arch == "opt":
        # word_embed_proj_dim = hidden: no projection layers around the embedding.
        return {**common, "ffn_dim": ffn, "word_embed_proj_dim": hidden}
    gated = {**common, "intermediate_size": intermediate, "num_key_value_heads": kv_heads}
    if arch == "qwen3":
        # Qwen3's default head_dim (128) ignores hidden/heads, so set it.
        return {**gated, "head_dim": hidden // heads}
    return gated


# SIZE_PRESETS[arch][size] = keyword arguments of that arch's HF config class.
SIZE_PRESETS: dict[str, dict[str, dict]] = {arch: {size: _preset(arch, size) for size in SIZES} for arch in ARCHS}


def _allowed_config_keys(config_class) -> set[str]:
    # HF configs silently accept unknown keyword arguments, so a typo such as
    # "hidden_sise" would be ignored; check against what the class knows.
    params = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return params | set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _has_tokenizer(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((directory / n).is_file() for n in names)


def build_causal_lm(
    arch: str = "opt",
    size: str = "tiny",
    config: dict | None = None,
    path: str | os.PathLike | None = None,
    tokenizer=None,
    dtype: str = "float32",
    tie_word_embeddings: bool | None = None,
    attn_implementation: str = "eager",
):
    """Return ``(model, tokenizer)``.

    With ``path`` None: a new ``arch`` model of preset ``size``, with the keys
    of ``config`` overriding the preset (any key of the arch's HF config
    class), ``vocab_size = len(tokenizer)`` and pad/bos/eos ids from the
    tokenizer (the bundled one if ``tokenizer`` is None).  Weights are
    initialised by ``transformers``, so ``torch.manual_seed`` makes them
    reproducible.  ``tie_word_embeddings`` None keeps the arch's default.

    With ``path``: the model saved there (``save_pretrained``), or the bundled
    model ``"bundled:<name>"`` (see ``BUNDLED_MODELS``), loaded with
    ``local_files_only=True``; ``arch``/``size`` are not used, and ``config``
    or ``tie_word_embeddings`` raise ValueError (they would be ignored).  The
    tokenizer is ``tokenizer`` if given, else the one saved in ``path``, else
    the bundled one.
    """
    torch_dtype = _resolve_dtype(dtype)

    if path is not None:
        directory = resolve_model_path(path)
        if not directory.exists():
            raise FileNotFoundError(f"model path does not exist: {directory}")
        if config:
            raise ValueError(
                f"config overrides {sorted(config)} cannot be applied when loading a saved model "
                f"from {directory}; edit its config.json or build from a preset (path=None) instead"
            )
        if tie_word_embeddings is not None:
            # Untying at load time would give a freshly initialised lm_head.
            raise ValueError(
                f"tie_word_embeddings cannot be changed when loading a saved model from {directory}; "
                "it keeps the tying in its config.json"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        if tokenizer is None:
            tokenizer = load_tokenizer(directory if _has_tokenizer(directory) else None)
        _check_vocab(model, tokenizer)
        return model, tokenizer

    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if size not in SIZE_PRESETS[arch]:
        raise ValueError(f"unknown size {size!r} for arch {arch!r}; allowed: {', '.join(SIZE_PRESETS[arch])}")
    config_class = CONFIG_CLASSES[arch]
    overrides = dict(config or {})
    unknown = sorted(set(overrides) - _allowed_config_keys(config_class))
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} key(s) {unknown} in config overrides; "
            f"allowed: {', '.join(sorted(_allowed_config_keys(config_class)))}"
        )

    if tokenizer is None:
        tokenizer = load_tokenizer()
    kwargs = {
        **SIZE_PRESETS[arch][size],
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    # Keep the preset's derived fields consistent with an overridden width.
    if arch == "opt" and "word_embed_proj_dim" not in overrides:
        kwargs["word_embed_proj_dim"] = kwargs["hidden_size"]
    if arch == "qwen3" and "head_dim" not in overrides:
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_word_embeddings
    cfg = config_class(**kwargs)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, attn_implementation=attn_implementation)
    _check_vocab(model, tokenizer)
    return model, tokenizer


def _check_vocab(model: nn.Module, tokenizer) -> None:
    # A token id past the embedding table fails deep inside the model with an
    # index error; say what is wrong up front instead.
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows; "
            "use the tokenizer the model was built with, or a larger vocab_size"
        )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_name, blocks)``: the model's list of transformer blocks.

    That is the ``nn.ModuleList`` whose entries all have the same class and
    which holds the most parameters (e.g. ``model.decoder.layers`` for OPT,
    ``model.layers`` for Qwen3/LLaMA).  ``model.get_submodule(name)`` gives
    the list back.
    """
    best: tuple[int, int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        # Most parameters wins; on a tie, the longer list, then the shallower name.
        key = (n_params, len(module), -name.count("."))
        if best is None or key > best[:3]:
            best = (*key, name, module)
    if best is None:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}: looked for a non-empty "
            "torch.nn.ModuleList whose entries all have the same class"
        )
    return best[3], best[4]
