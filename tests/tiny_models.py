"""Tiny, deterministic Hugging Face models for tests (built from configs only, no Hub access).

Public helpers:

* :data:`ARCHITECTURES` -- architecture keys understood by the helpers below.
* :func:`tiny_config` -- a tiny config for one architecture.
* :func:`tiny_model` -- a randomly initialised tiny model (``"causal_lm"`` or ``"seq_cls"`` head).
* :func:`tiny_peft_lora_model` -- a tiny llama-family model wrapped in a PEFT LoRA adapter.
* :data:`EXPECTED` / :data:`EXPECTED_PEFT` -- structure ground truth keyed by ``(arch, head)``,
  derived by inspecting the real models in the installed ``transformers`` / ``peft`` versions
  and written here as literal data so an independent implementation can be checked against it
  (see the conventions comment above :class:`StructureInfo`).
"""

from __future__ import annotations

import warnings
from typing import Any, Final, TypedDict

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

__all__ = [
    "ARCHITECTURES",
    "ENCODER_ARCHITECTURES",
    "HEADS",
    "PEFT_ARCHITECTURES",
    "EXPECTED",
    "EXPECTED_PEFT",
    "StructureInfo",
    "PeftStructureInfo",
    "tiny_config",
    "tiny_model",
    "tiny_peft_lora_model",
]

ARCHITECTURES: Final[list[str]] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi3",
    "gpt2",
    "gpt_neox",
    "bert",
    "roberta",
]
"""Architecture keys accepted by :func:`tiny_config` and :func:`tiny_model`."""

ENCODER_ARCHITECTURES: Final[frozenset[str]] = frozenset({"bert", "roberta"})
"""Encoder-only architectures: for these the ``"causal_lm"`` head means the masked-LM model."""

HEADS: Final[tuple[str, ...]] = ("causal_lm", "seq_cls")
"""Head names accepted by :func:`tiny_model`."""

PEFT_ARCHITECTURES: Final[tuple[str, ...]] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
)
"""Architectures with separate ``q_proj``/``v_proj`` modules (see :func:`tiny_peft_lora_model`)."""

# Shared tiny dimensions.
_NUM_LAYERS: Final = 3
_HIDDEN: Final = 64
_INTERMEDIATE: Final = 128
_ATTN_HEADS: Final = 4
_KV_HEADS: Final = 2
_HEAD_DIM: Final = _HIDDEN // _ATTN_HEADS
_VOCAB: Final = 128
_MAX_POS: Final = 64
_NUM_LABELS: Final = 3
_PAD, _BOS, _EOS = 0, 1, 2

_CONFIG_CLASSES: Final[dict[str, type[PretrainedConfig]]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "phi3": Phi3Config,
    "gpt2": GPT2Config,
    "gpt_neox": GPTNeoXConfig,
    "bert": BertConfig,
    "roberta": RobertaConfig,
}


def _arch_kwargs(arch: str) -> dict[str, Any]:
    """Architecture-specific tiny config kwargs (before user overrides)."""
    common: dict[str, Any] = {
        "vocab_size": _VOCAB,
        "num_labels": _NUM_LABELS,
        "pad_token_id": _PAD,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "initializer_range": 0.02,
    }
    if arch == "gpt2":
        return {
            **common,
            "n_layer": _NUM_LAYERS,
            "n_embd": _HIDDEN,
            "n_inner": _INTERMEDIATE,
            "n_head": _ATTN_HEADS,
            "n_positions": _MAX_POS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    base = {
        **common,
        "num_hidden_layers": _NUM_LAYERS,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_attention_heads": _ATTN_HEADS,
        "max_position_embeddings": _MAX_POS,
    }
    if arch in ("bert", "roberta"):
        # RoBERTa position ids start at pad_token_id + 1, so with pad 0 sequences
        # of up to _MAX_POS - 1 tokens fit.
        return {
            **base,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    if arch == "gpt_neox":  # no grouped-query attention
        return {**base, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    decoder = {**base, "num_key_value_heads": _KV_HEADS}
    if arch in ("llama", "mistral", "qwen3", "gemma", "gemma2"):
        decoder["head_dim"] = _HEAD_DIM  # otherwise some default to 128/256
    if arch == "gemma2":
        decoder["query_pre_attn_scalar"] = _HEAD_DIM
        decoder["sliding_window"] = _MAX_POS // 2
    if arch == "phi3":
        decoder["original_max_position_embeddings"] = _MAX_POS
        decoder["resid_pdrop"] = 0.0
        decoder["embd_pdrop"] = 0.0
    return decoder


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Return a tiny deterministic config for ``arch``; ``overrides`` win over the defaults.

    3 layers, hidden 64, intermediate 128, 4 heads (2 KV heads where supported), vocab 128,
    64 positions, ``num_labels=3`` and ``pad_token_id=0``. ``tie_word_embeddings`` keeps the
    config class default unless overridden.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    kwargs = {**_arch_kwargs(arch), **overrides}
    return _CONFIG_CLASSES[arch](**kwargs)


def tiny_model(
    arch: str, head: str = "causal_lm", seed: int = 0, **config_overrides: Any
) -> PreTrainedModel:
    """Build a randomly initialised tiny model in eval mode (float32, eager attention).

    ``head`` is ``"causal_lm"`` or ``"seq_cls"``. For the encoder-only architectures
    (``bert``, ``roberta``) ``"causal_lm"`` builds the *masked*-LM model
    (``BertForMaskedLM`` / ``RobertaForMaskedLM``), which is their LM head.
    ``torch`` is seeded with ``seed`` right before construction, so equal arguments
    give identical weights.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    config = tiny_config(arch, **config_overrides)
    if head == "seq_cls":
        auto_cls: Any = AutoModelForSequenceClassification
    elif arch in ENCODER_ARCHITECTURES:
        auto_cls = AutoModelForMaskedLM
    else:
        auto_cls = AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto_cls.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def tiny_peft_lora_model(arch: str = "llama", head: str = "causal_lm") -> PeftModel:
    """Wrap :func:`tiny_model` in a PEFT LoRA adapter (r=4 on ``q_proj``/``v_proj``).

    Only :data:`PEFT_ARCHITECTURES` have those modules. For ``head="seq_cls"`` the task type
    is ``SEQ_CLS`` so PEFT puts the classification head (``score``) in ``modules_to_save``.
    """
    if arch not in PEFT_ARCHITECTURES:
        raise ValueError(f"{arch!r} has no q_proj/v_proj; expected one of {PEFT_ARCHITECTURES}")
    task_type = TaskType.SEQ_CLS if head == "seq_cls" else TaskType.CAUSAL_LM
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type=task_type,
    )
    model = tiny_model(arch, head)
    torch.manual_seed(0)  # LoRA A matrices are randomly initialised
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API that is deprecated (`is_gradient_checkpointing`).
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, lora)


# ---------------------------------------------------------------------------------------------
# Structure ground truth.
#
# Generated by building every ``tiny_model(arch, head)`` (transformers 5.24, peft 0.21) and
# inspecting ``named_modules()`` / ``named_parameters()``; do not edit by hand. Conventions:
#
# * All parameter names are as yielded by ``model.named_parameters()`` (duplicates removed, so
#   a tied parameter appears once, under its first -- canonical -- name). The other names of a
#   shared Parameter are listed in ``tied_aliases`` (alias -> canonical), taken from
#   ``named_parameters(remove_duplicate=False)``; this includes the MLM decoder-bias aliases.
# * ``embedding_params``, the blocks under ``layers_path``, ``norm_params`` and ``head_params``
#   partition all ``num_named_params`` parameters. ``head_params`` is everything outside the
#   backbone (``model.base_model``) plus the BERT pooler, which is repeated in ``pooler_params``.
#   A tied LM head therefore contributes no own names to ``head_params``.
# * ``tied`` is True iff the output embedding's weight *is* the input embedding's Parameter.
# ---------------------------------------------------------------------------------------------


class StructureInfo(TypedDict):
    """Ground-truth structure of one tiny model."""

    layers_path: str
    num_layers: int
    embedding_params: list[str]
    norm_params: list[str]
    head_params: list[str]
    pooler_params: list[str]
    tied: bool
    tied_aliases: dict[str, str]
    num_named_params: int


class PeftStructureInfo(StructureInfo):
    """Ground truth for a LoRA-wrapped model (names as seen from the ``PeftModel``)."""

    lora_params: list[str]
    trainable_params: list[str]
    modules_to_save: list[str]


EXPECTED: Final[dict[tuple[str, str], StructureInfo]] = {
    ("llama", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 30,
    },
    ("llama", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 30,
    },
    ("mistral", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 30,
    },
    ("mistral", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 30,
    },
    ("qwen2", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 39,
    },
    ("qwen2", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 39,
    },
    ("qwen3", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 36,
    },
    ("qwen3", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 36,
    },
    ("gemma", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": [],
        "pooler_params": [],
        "tied": True,
        "tied_aliases": {
            "lm_head.weight": "model.embed_tokens.weight",
        },
        "num_named_params": 29,
    },
    ("gemma", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 30,
    },
    ("gemma2", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": [],
        "pooler_params": [],
        "tied": True,
        "tied_aliases": {
            "lm_head.weight": "model.embed_tokens.weight",
        },
        "num_named_params": 35,
    },
    ("gemma2", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 36,
    },
    ("phi3", "causal_lm"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 21,
    },
    ("phi3", "seq_cls"): {
        "layers_path": "model.layers",
        "num_layers": 3,
        "embedding_params": ["model.embed_tokens.weight"],
        "norm_params": ["model.norm.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 21,
    },
    ("gpt2", "causal_lm"): {
        "layers_path": "transformer.h",
        "num_layers": 3,
        "embedding_params": ["transformer.wpe.weight", "transformer.wte.weight"],
        "norm_params": ["transformer.ln_f.bias", "transformer.ln_f.weight"],
        "head_params": [],
        "pooler_params": [],
        "tied": True,
        "tied_aliases": {
            "lm_head.weight": "transformer.wte.weight",
        },
        "num_named_params": 40,
    },
    ("gpt2", "seq_cls"): {
        "layers_path": "transformer.h",
        "num_layers": 3,
        "embedding_params": ["transformer.wpe.weight", "transformer.wte.weight"],
        "norm_params": ["transformer.ln_f.bias", "transformer.ln_f.weight"],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 41,
    },
    ("gpt_neox", "causal_lm"): {
        "layers_path": "gpt_neox.layers",
        "num_layers": 3,
        "embedding_params": ["gpt_neox.embed_in.weight"],
        "norm_params": [
            "gpt_neox.final_layer_norm.bias",
            "gpt_neox.final_layer_norm.weight",
        ],
        "head_params": ["lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 40,
    },
    ("gpt_neox", "seq_cls"): {
        "layers_path": "gpt_neox.layers",
        "num_layers": 3,
        "embedding_params": ["gpt_neox.embed_in.weight"],
        "norm_params": [
            "gpt_neox.final_layer_norm.bias",
            "gpt_neox.final_layer_norm.weight",
        ],
        "head_params": ["score.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 40,
    },
    ("bert", "causal_lm"): {
        "layers_path": "bert.encoder.layer",
        "num_layers": 3,
        "embedding_params": [
            "bert.embeddings.LayerNorm.bias",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
        ],
        "norm_params": [],
        "head_params": [
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
        ],
        "pooler_params": [],
        "tied": True,
        "tied_aliases": {
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
        "num_named_params": 58,
    },
    ("bert", "seq_cls"): {
        "layers_path": "bert.encoder.layer",
        "num_layers": 3,
        "embedding_params": [
            "bert.embeddings.LayerNorm.bias",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.word_embeddings.weight",
        ],
        "norm_params": [],
        "head_params": [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight",
        ],
        "pooler_params": ["bert.pooler.dense.bias", "bert.pooler.dense.weight"],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 57,
    },
    ("roberta", "causal_lm"): {
        "layers_path": "roberta.encoder.layer",
        "num_layers": 3,
        "embedding_params": [
            "roberta.embeddings.LayerNorm.bias",
            "roberta.embeddings.LayerNorm.weight",
            "roberta.embeddings.position_embeddings.weight",
            "roberta.embeddings.token_type_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight",
        ],
        "norm_params": [],
        "head_params": [
            "lm_head.bias",
            "lm_head.dense.bias",
            "lm_head.dense.weight",
            "lm_head.layer_norm.bias",
            "lm_head.layer_norm.weight",
        ],
        "pooler_params": [],
        "tied": True,
        "tied_aliases": {
            "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias",
        },
        "num_named_params": 58,
    },
    ("roberta", "seq_cls"): {
        "layers_path": "roberta.encoder.layer",
        "num_layers": 3,
        "embedding_params": [
            "roberta.embeddings.LayerNorm.bias",
            "roberta.embeddings.LayerNorm.weight",
            "roberta.embeddings.position_embeddings.weight",
            "roberta.embeddings.token_type_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight",
        ],
        "norm_params": [],
        "head_params": [
            "classifier.dense.bias",
            "classifier.dense.weight",
            "classifier.out_proj.bias",
            "classifier.out_proj.weight",
        ],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 57,
    },
}


EXPECTED_PEFT: Final[dict[tuple[str, str], PeftStructureInfo]] = {
    ("llama", "causal_lm"): {
        "layers_path": "base_model.model.model.layers",
        "num_layers": 3,
        "embedding_params": ["base_model.model.model.embed_tokens.weight"],
        "norm_params": ["base_model.model.model.norm.weight"],
        "head_params": ["base_model.model.lm_head.weight"],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 42,
        "lora_params": [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight",
        ],
        "trainable_params": [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight",
        ],
        "modules_to_save": [],
    },
    ("llama", "seq_cls"): {
        "layers_path": "base_model.model.model.layers",
        "num_layers": 3,
        "embedding_params": ["base_model.model.model.embed_tokens.weight"],
        "norm_params": ["base_model.model.model.norm.weight"],
        "head_params": [
            "base_model.model.score.modules_to_save.default.weight",
            "base_model.model.score.original_module.weight",
        ],
        "pooler_params": [],
        "tied": False,
        "tied_aliases": {},
        "num_named_params": 43,
        "lora_params": [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight",
        ],
        "trainable_params": [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight",
            "base_model.model.score.modules_to_save.default.weight",
        ],
        "modules_to_save": ["base_model.model.score"],
    },
}
