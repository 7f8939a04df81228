"""LLaMA-Factory training YAMLs (``stage: sft``, ``finetuning_type: lora``, ``freeze`` or ``full``), translated.

``hf-llama-strategies train lf.yaml`` reads a LLaMA-Factory 0.9.5 config, prints the
equivalent native YAML (with a note for every key that is renamed, dropped or means
something slightly different), and trains that. Each LLaMA-Factory key is in one of the
tables below: translated (:func:`translate_llamafactory`), passed on as it is (a
``TrainingArguments`` or native key of the same meaning), dropped with a note (performance,
logging or inference knobs that do not change what is trained), or refused by name (LoRA,
preference and reward stages, other optimizers, multimodal and quantized models).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from ..core.options import check_positive_int
from ..data.chat_templates import MULTIMODAL_TEMPLATE, TEMPLATES
from ..data.sft import UNREAD_BY_DEFAULT, normalise_format
from ..errors import InvalidArgumentError, UnsupportedKeyError
from .config import known_keys, unknown_key_error

# Keys that only LLaMA-Factory configs hold: one of the first makes a config one, or `dataset`
# with one of the others (a native config with a stray `dataset` key is an unknown key, not LF).
MARKERS = ("stage", "finetuning_type")
_DATA_MARKERS = ("template", "cutoff_len", "dataset_dir", "freeze_trainable_layers")

# LoRA keys (finetuning_type: lora), translated into PEFT's LoraConfig through TRL's key names.
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "loraplus_lr_ratio",
             "loraplus_lr_embedding", "use_rslora", "use_dora", "create_new_adapter", "adapter_name_or_path")

TRANSLATED = {
    "stage", "finetuning_type", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    "use_llama_pro", "dataset", "eval_dataset", "dataset_dir", "cutoff_len", "template", "max_samples", "val_size",
    "train_on_prompt", "packing", "neat_packing", "default_system", "enable_thinking", "deepspeed", "tool_format",
    "evaluation_strategy", "warmup_ratio", "mask_history", "use_dft_loss", "bf16", "fp16",
    "disable_gradient_checkpointing", "use_reentrant_gc",
    *LORA_KEYS,
}

# Dropped with a note: they change speed, memory, logging or inference, not what is trained.
DROPPED = {
    "preprocessing_num_workers": "dataset preprocessing runs in this process",
    "preprocessing_batch_size": "dataset preprocessing batch size",
    "overwrite_cache": "no preprocessing cache is kept",
    "tokenized_path": "no preprocessing cache is kept",
    "data_shared_file_system": "no preprocessing cache is kept",
    "plot_loss": "losses are in trainer_state.json and TensorBoard",
    "include_effective_tokens_per_second": "a logging knob",
    "print_param_status": "the plan table lists every block's trainable parameters",
    "flash_attn": "attention kernel choice (the model's default is used)",
    "enable_liger_kernel": "kernel choice",
    "use_v1_kernels": "kernel choice",
    "low_cpu_mem_usage": "loading detail",
    "use_fast_tokenizer": "the tokenizer's fast version is used when it has one",
    "cache_dir": "models load from model_name_or_path",
    "hf_hub_token": "nothing is downloaded here", "ms_hub_token": "nothing is downloaded here",
    "om_hub_token": "nothing is downloaded here",
    "media_dir": "text-only data", "image_max_pixels": "text-only data", "image_min_pixels": "text-only data",
    "image_do_pan_and_scan": "text-only data", "crop_to_patches": "text-only data",
    "video_max_pixels": "text-only data", "video_min_pixels": "text-only data", "video_fps": "text-only data",
    "video_maxlen": "text-only data", "use_audio_in_video": "text-only data", "audio_sampling_rate": "text-only data",
    "freeze_vision_tower": "text-only model", "freeze_multi_modal_projector": "text-only model",
    "freeze_language_model": "text-only model",
    "buffer_size": "streaming buffer", "eval_num_beams": "generation setting",
    "ignore_pad_token_for_loss": "padding never counts in the loss here",
    "compute_accuracy": "SFTTrainer logs mean_token_accuracy",
    "infer_backend": "inference setting", "infer_dtype": "inference setting", "use_kv_cache": "inference setting",
    "offload_folder": "loading detail", "device_map": "loading detail", "model_max_length": "cutoff_len decides",
    "generation_max_length": "generation setting", "generation_num_beams": "generation setting",
    "generation_config": "generation setting", "sortish_sampler": "Seq2Seq sampler option",
    "master_addr": "set by the launcher", "master_port": "set by the launcher",
    "compute_dtype": "derived from bf16/fp16", "profile_modules": "a profiling knob",
    "resize_vocab": "the embeddings grow whenever the template adds tokens (as LLaMA-Factory's resize_vocab: "
                    "64-row multiples, new rows the mean plus noise, trained with LoRA)",
}
_DROPPED_PREFIXES = ("vllm_", "sglang_", "export_", "profiler_", "swanlab_", "ray_")
_GENERATION = {"do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens",
               "repetition_penalty", "length_penalty", "skip_special_tokens"}

# Refused when set to anything but the value shown (LLaMA-Factory's default, or off).
REFUSED_UNLESS = {
    "streaming": (False, "datasets are read whole"),
    "mix_strategy": ("concat", "datasets are concatenated"),
    "interleave_probs": (None, "datasets are concatenated"),
    "eval_on_each_dataset": (False, "one evaluation set"),
    "preserve_thinking": (False, "thoughts of earlier turns are kept as written"),
    "use_galore": (False, "GaLore is another optimizer"), "use_apollo": (False, "APOLLO is another optimizer"),
    "use_badam": (False, "BAdam is another optimizer"), "use_adam_mini": (False, "Adam-mini is another optimizer"),
    "use_muon": (False, "Muon is another optimizer"), "use_mca": (False, "Megatron-Core is another backend"),
    "use_hyper_parallel": (False, "another parallel backend"), "hyper_parallel_args": (None, "another backend"),
    "use_kt": (False, "KTransformers is another backend"), "use_asft_loss": (False, "another loss"),
    "use_eaft_loss": (False, "another loss"), "use_unsloth": (False, "Unsloth patches the model"),
    "use_unsloth_gc": (False, "Unsloth patches the model"),
    "mixture_of_depths": (None, "it changes the model"), "shift_attn": (False, "it changes the attention"),
    "rope_scaling": (None, "it changes the model"),
    "split_special_tokens": (False, "special tokens stay whole"), "add_tokens": (None, "the vocabulary stays"),
    "add_special_tokens": (None, "the vocabulary stays"), "new_special_tokens_config": (None, "the vocabulary stays"),
    "init_special_tokens": (None, "the vocabulary stays"),
    "upcast_layernorm": (False, "it changes the numerics"), "upcast_lmhead_output": (False, "it changes the numerics"),
    "train_from_scratch": (False, "use the native model_config key to build fresh weights"),
    "model_revision": ("main", "models load from a local path"),
    "adapter_folder": (None, "adapters are PEFT's business"),
    "quantization_bit": (None, "quantized (QLoRA) models are not supported"),
    "quantization_method": ("bnb", "quantized models are not supported"),
    "quantization_type": ("nf4", "quantized models are not supported"),
    "double_quantization": (True, "quantized models are not supported"),
    "quantization_device_map": (None, "quantized models are not supported"),
    "block_diag_attn": (False, "packing here is TRL's"), "moe_aux_loss_coef": (None, "the model's default is used"),
    "predict_with_generate": (False, "generation is not evaluated here"),
    "do_predict": (False, "generation is not evaluated here"),
    "disable_shuffling": (False, "the Trainer shuffles the training data"),
    "early_stopping_steps": (None, "use transformers' EarlyStoppingCallback in Python"),
    "fp8": (False, "fp8 training is not supported"), "fp8_backend": ("auto", "fp8 training is not supported"),
    "fp8_enable_fsdp_float8_all_gather": (False, "fp8 training is not supported"),
    "use_swanlab": (False, "use report_to"), "use_ray": (False, "launch with torchrun or accelerate"),
    "enable_torch_profiler": (False, "a profiling knob"),
}
# Refused whatever their value: they belong to methods this library does not run.
_REFUSED_PREFIXES = {
    "lora_": "not a LoRA key of LLaMA-Factory 0.9.5 (lora_rank, lora_alpha, lora_dropout, lora_target are)",
    "loraplus_": "LoRA+ keys here are loraplus_lr_ratio and loraplus_lr_embedding",
    "pissa_": "PiSSA initialisation is not translated (plain LoRA is)", "module_dropout": "OFT", "oft_": "OFT",
    "pref_": "preference training (DPO/ORPO/SimPO) is not SFT", "dpo_": "DPO is not SFT", "kto_": "KTO is not SFT",
    "simpo_": "SimPO is not SFT", "ppo_": "PPO is not SFT", "ref_model": "a reference model is for preference "
    "training", "reward_model": "reward models are for PPO", "ld_alpha": "preference training",
    **dict.fromkeys(
        ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
         "expert_model_parallel_size", "context_parallel_size", "sequence_parallel", "bias_activation_fusion",
         "apply_rope_fusion", "use_distributed_optimizer", "overlap_param_gather", "overlap_grad_reduce",
         "moe_grouped_gemm", "moe_token_dispatcher_type", "recompute_granularity"),
        "a Megatron-Core training key (LLaMA-Factory's examples/megatron, launched with USE_MCA=1); "
        "Megatron-Core is another backend",
    ),
}
_SWITCHED = {"galore_": "use_galore", "apollo_": "use_apollo", "badam_": "use_badam", "kt_": "use_kt",
             "asft_alpha": "use_asft_loss", "eaft_alpha": "use_eaft_loss"}


def is_llamafactory_config(config: dict[str, Any]) -> bool:
    """Whether ``config`` is a LLaMA-Factory training YAML (it holds a key only those have)."""
    return any(key in config for key in MARKERS) or ("dataset" in config and any(k in config for k in _DATA_MARKERS))


def _refuse(key: str, value: Any, why: str) -> UnsupportedKeyError:
    return UnsupportedKeyError(
        f"LLaMA-Factory key {key}={value!r} has no meaning here: {why}. Remove it to train the rest "
        "(hf-llama-strategies translates stage: sft with finetuning_type: lora, freeze or full)."
    )


def _resolve(path: str, base_dir: str) -> str:
    """A relative path next to the config file, else from the current directory (as LLaMA-Factory,
    run from its own directory), else from a directory above the config file's (LF's configs live
    in ``examples/<kind>/``, its ``data/`` two levels up)."""
    if os.path.isabs(path):
        return path
    candidates = [os.path.join(base_dir, path), path]
    parent = os.path.abspath(base_dir)
    while os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
        candidates.append(os.path.join(parent, path))
    return os.path.abspath(next((c for c in candidates if os.path.exists(c)), path))


def _whole(config: dict[str, Any], key: str, default: Any, positive: bool = False,
           option: Optional[str] = None) -> Any:
    """``config[key]`` (or ``default``; None stays None), checked to be a whole number (``positive``: at least 1)."""
    value = config.get(key, default)
    if value is None:
        return None
    if positive:
        return check_positive_int(option or key, value, expected="a whole number of at least 1")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(option or key, value, "a whole number")
    return value


def _flag(config: dict[str, Any], key: str) -> bool:
    """``config[key]`` checked to be true, false or unset (a typo such as ``yes`` would silently switch it on)."""
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentError(key, value, "true or false")
    return bool(value)


def _mapping(value: Any, option: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(option, value, "a mapping of names, as in LLaMA-Factory's dataset_info.json")
    return dict(value)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _dataset_specs(names: list[str], dataset_dir: str, max_samples: Optional[int], notes: list[str]) -> list[dict]:
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(info_path):
        raise InvalidArgumentError("dataset_dir", dataset_dir, "a directory holding dataset_info.json",
                                   f"No {info_path}.")
    with open(info_path, encoding="utf-8") as fh:
        try:
            info = json.load(fh)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError("dataset_dir", dataset_dir, f"a valid JSON {info_path}", str(exc)) from None
    if not isinstance(info, dict):
        raise InvalidArgumentError("dataset_dir", dataset_dir, f"a {info_path} mapping dataset names to entries")
    specs = []
    for name in names:
        if name not in info:
            raise InvalidArgumentError("dataset", name, f"a dataset named in {info_path}: {sorted(info)}")
        attr = info[name]
        if not isinstance(attr, dict) or "file_name" not in attr:
            raise _refuse(f"dataset {name!r}", attr, "it is on a hub or behind a script; this runs offline from "
                          "local files: download it and give its file_name in dataset_info.json")
        if attr.get("ranking"):
            raise _refuse(f"dataset {name!r}", "ranking: true", "pairwise (DPO/RM) data is not SFT data")
        given = _mapping(attr.get("columns"), f"dataset {name!r} columns")
        fmt = normalise_format(attr.get("formatting", "alpaca"), f"dataset {name!r} formatting")
        if fmt == "alpaca" and set(given) == {"prompt"}:
            raise _refuse(f"dataset {name!r} columns", given, "one text column is LLaMA-Factory's pre-training "
                          "(stage: pt) data, with no response to learn; for raw text use the native task: causal_lm")
        for column in ("images", "videos", "audios", "chosen", "rejected", "kto_tag"):
            if given.get(column):
                raise _refuse(f"dataset {name!r} columns.{column}", given[column],
                              "multimodal and preference columns are not supported")
        columns = _lf_columns(name, attr, given, fmt)
        tags = _lf_tags(attr, f"dataset {name!r} tags")
        path = os.path.join(dataset_dir, attr["file_name"])
        files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith((".json", ".jsonl"))]
                 if os.path.isdir(path) else [path])
        limit = max_samples
        if _whole(attr, "num_samples", None, positive=True, option=f"dataset {name!r} num_samples") is not None:
            limit = attr["num_samples"] if limit is None else min(limit, attr["num_samples"])
            notes.append(f"dataset {name}: num_samples {attr['num_samples']} keeps the first records "
                         "(LLaMA-Factory draws them at random)")
        for file in files:
            spec: dict[str, Any] = {"file": file, "format": fmt}
            if columns:
                spec["columns"] = columns
            if tags:
                spec["tags"] = tags
            if limit is not None:
                spec["max_samples"] = int(limit)
            specs.append(spec)
    return specs


def _lf_columns(name: str, attr: dict[str, Any], given: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The columns LLaMA-Factory reads: with a ``columns`` entry, exactly those it names (the others
    unread, whatever their defaults); without one, its defaults, ``system``, ``history`` and
    ``tools`` unread."""
    if "columns" not in attr:
        return {column: None for column in UNREAD_BY_DEFAULT}
    names = ("prompt", "query", "response", "history", "system", "tools") if fmt == "alpaca" \
        else ("messages", "system", "tools")
    if fmt != "alpaca" and not given.get("messages"):
        raise InvalidArgumentError(f"dataset {name!r} columns", given, "a mapping naming the `messages` column "
                                   "(LLaMA-Factory reads only the columns an entry names)")
    return {column: given.get(column) for column in names}


def _lf_tags(attr: dict[str, Any], option: str) -> dict[str, Any]:
    """With a ``tags`` entry, exactly the tags it names (LLaMA-Factory leaves the others unset)."""
    if "tags" not in attr:
        return {}
    given = _mapping(attr["tags"], option)
    return {tag: given.get(tag) for tag in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                                            "function_tag", "system_tag")}


def _model_config(path: Optional[str], trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code) if path else None
    except (OSError, ValueError):
        return None


def _freeze_options(config: dict[str, Any], model_config: Any, notes: list[str]) -> dict[str, Any]:
    """LLaMA-Factory's freeze tuning as strategy options (``_setup_freeze_tuning`` in its adapter.py)."""
    layers = _whole(config, "freeze_trainable_layers", 2)
    num_layers = getattr(model_config, "num_hidden_layers", None) if model_config is not None else None
    out: dict[str, Any] = {"train_embeddings": False, "train_norm": False, "train_head": False}
    llama_pro = _flag(config, "use_llama_pro")
    if llama_pro and num_layers is not None and layers >= num_layers:
        out["trainable_layers"] = "all"
        notes.append(f"use_llama_pro with {layers} of {num_layers} layers: every layer trains")
    elif llama_pro:
        if num_layers is None or layers <= 0 or num_layers % layers:
            raise InvalidArgumentError("freeze_trainable_layers", layers, "a divisor of the model's layer count "
                                       f"({num_layers}) with use_llama_pro")
        stride = num_layers // layers
        out["trainable_layers"] = f"{stride - 1}::{stride}"
        notes.append(
            f"use_llama_pro with {layers} layers: layers {stride - 1}, {2 * stride - 1}, ... (one in {stride})"
        )
    elif layers == 0:
        out["trainable_layers"] = "none"
    else:
        count = abs(layers) if num_layers is None else min(abs(layers), num_layers)
        out["trainable_layers"] = f"-{count}:" if layers > 0 else f":{count}"
    modules = _names(config.get("freeze_trainable_modules", "all"))
    if modules and "all" not in modules:
        out["trainable_modules"] = ",".join(modules)
    extras = _names(config.get("freeze_extra_modules"))
    tied = bool(getattr(model_config, "tie_word_embeddings", False)) if model_config is not None else False
    patterns = []
    for module in extras:
        if module == "embed_tokens" or (tied and module == "lm_head"):
            out["train_embeddings"] = True
            out["train_head"] = out["train_head"] or tied
        elif module == "lm_head":
            out["train_head"] = True
        else:
            # LLaMA-Factory matches these names as substrings of parameter names: `norm` trains
            # every layer's norms too, not only the final one.
            patterns.append(re.escape(module))
    if tied and out["train_embeddings"]:
        out["train_head"] = True
    if patterns:
        out["trainable_params"] = patterns
        notes.append(f"freeze_extra_modules {patterns}: matched inside parameter names, as LLaMA-Factory does")
    return out


def _check_key(key: str, value: Any, config: dict[str, Any], native: set[str], notes: list[str]) -> str:
    """'translate', 'pass', or 'drop' (noted); raises for a refused or unknown key."""
    if key in TRANSLATED:
        return "translate"
    for prefix, why in _REFUSED_PREFIXES.items():
        if key.startswith(prefix):
            raise _refuse(key, value, why)
    for prefix, switch in _SWITCHED.items():
        if key.startswith(prefix):
            if config.get(switch):
                raise _refuse(switch, config[switch], REFUSED_UNLESS[switch][1])
            notes.append(f"{key}: dropped ({switch} is off)")
            return "drop"
    if key in REFUSED_UNLESS:
        default, why = REFUSED_UNLESS[key]
        if value is not None and value != default and not (value is False and default is None):
            raise _refuse(key, value, why)
        return "drop"
    if key in DROPPED or key.startswith(_DROPPED_PREFIXES) or key in _GENERATION:
        notes.append(f"{key}: dropped ({DROPPED.get(key, 'inference, export or profiling setting')})")
        return "drop"
    if key in native:
        return "pass"
    return "unknown"


def translate_llamafactory(
    config: dict[str, Any], base_dir: str = ".", notes: Optional[list[str]] = None
) -> dict[str, Any]:
    """The native config equivalent to a LLaMA-Factory training YAML.

    The same YAML translates to the same native config on every machine: what depends on the
    hardware (bf16 on a CPU, DeepSpeed in one process) is decided when the run starts.

    Args:
        config: the LLaMA-Factory YAML, as a mapping.
        base_dir: the folder of the YAML file (relative paths are looked for from there).
        notes: filled with a line for every key renamed, dropped or slightly different in meaning.

    Raises:
        UnsupportedKeyError: a key with no meaning here (named), a stage other than ``sft``,
            a ``finetuning_type`` other than ``lora``/``freeze``/``full``.
        CliError: an unknown key (with a "did you mean").
        InvalidArgumentError: a dataset not in ``dataset_info.json``, a missing file.
    """
    notes = notes if notes is not None else []
    finetuning = _check_stage(config)
    out = _passed_keys(config, notes)
    out["task"] = "sft"
    model_config = _model_config(out.get("model_name_or_path") or out.get("model_config"),
                                 bool(out.get("trust_remote_code")))
    if finetuning == "freeze":
        out.update(_freeze_options(config, model_config, notes))
    else:
        ignored = [k for k in ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
                   if k in config]
        if ignored:
            notes.append(f"{', '.join(ignored)}: ignored with finetuning_type: {finetuning} (as LLaMA-Factory does)")
    if finetuning == "lora":
        out.update(_lora_options(config, out, base_dir, notes))
    else:
        given = [k for k in LORA_KEYS if config.get(k) not in (None, False)]
        if given:
            raise _refuse(given[0], config[given[0]], f"it is a LoRA key, and finetuning_type is {finetuning}")
    out.update(_data_options(config, base_dir, model_config, notes))
    out.update(_template_options(config, notes))
    out.update(_training_options(config, base_dir))
    out.update(_checkpointing_options(config, notes))
    return out


def _check_stage(config: dict[str, Any]) -> str:
    """``finetuning_type`` of an SFT config; other stages and methods are refused by name."""
    stage = config.get("stage", "sft")
    if stage != "sft":
        hint = "; for pre-training on raw text use the native task: causal_lm" if stage == "pt" else ""
        raise _refuse("stage", stage, f"only stage: sft is translated{hint}")
    finetuning = config.get("finetuning_type", "lora")
    if finetuning not in ("freeze", "full", "lora"):
        raise _refuse("finetuning_type", finetuning, "only lora, freeze and full are translated (OFT is not)")
    return str(finetuning)


def _lora_options(config: dict[str, Any], passed: dict[str, Any], base_dir: str, notes: list[str]) -> dict[str, Any]:
    """LLaMA-Factory's LoRA keys as TRL's (PEFT's ``LoraConfig``), LoRA+ as ``lr_rules``."""
    if _flag(config, "use_llama_pro"):
        raise _refuse("use_llama_pro", True, "with finetuning_type: lora LLaMA-Factory puts adapters in the expanded "
                      "layers only; here set use_peft with trainable_layers natively (adapters of those layers train)")
    rank = _whole(config, "lora_rank", 8, positive=True)
    alpha = config.get("lora_alpha") or 2 * rank
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 1:
        raise InvalidArgumentError("lora_alpha", alpha, "a whole number of at least 1")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InvalidArgumentError("lora_dropout", dropout, "a probability in [0, 1)")
    targets = _names(config.get("lora_target", "all"))
    out: dict[str, Any] = {"use_peft": True, "lora_r": rank, "lora_alpha": alpha, "lora_dropout": float(dropout),
                           "lora_target_modules": ["all-linear"] if targets == ["all"] else targets}
    if targets == ["all"]:
        notes.append("lora_target: all: PEFT's all-linear, every linear layer but the output head (as LLaMA-Factory)")
    if config.get("additional_target"):
        out["lora_modules_to_save"] = _names(config["additional_target"])
    for key in ("use_rslora", "use_dora", "create_new_adapter"):
        if _flag(config, key):
            out[key] = True
    if config.get("adapter_name_or_path"):
        out["adapter_name_or_path"] = [_resolve(path, base_dir) for path in _names(config["adapter_name_or_path"])]
    ratio = config.get("loraplus_lr_ratio")
    if ratio is not None:
        out["lr_rules"] = list(passed.get("lr_rules") or []) + _loraplus_rules(config, ratio, targets)
        notes.append(f"loraplus_lr_ratio {ratio}: lr_rules {out['lr_rules']} (LLaMA-Factory also puts 1-D "
                     "parameters of additional_target modules at the ratio; here they keep learning_rate)")
    elif config.get("loraplus_lr_embedding") is not None:
        notes.append("loraplus_lr_embedding: dropped (it applies with loraplus_lr_ratio only)")
    return out


def _loraplus_rules(config: dict[str, Any], ratio: Any, targets: list[str]) -> list[str]:
    """LoRA+ as learning-rate rules: ``lora_B`` (and DoRA's magnitudes) at ``ratio`` times the rate."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise InvalidArgumentError("loraplus_lr_ratio", ratio, "a positive number (lr of lora_B / lr of lora_A)")
    rules = [f"lora_B=x{ratio}"]
    if _flag(config, "use_dora"):
        rules.append(f"lora_magnitude_vector=x{ratio}")
    if any("embed" in t for t in targets):
        embedding = config.get("loraplus_lr_embedding", 1e-6)
        rules.append(f"lora_embedding_B={embedding}")
    return rules


def _passed_keys(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The keys that mean the same here, as they are; every other key translated, dropped or refused by name."""
    native_keys = set(known_keys())
    out: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        kind = _check_key(key, value, config, native_keys, notes)
        if kind == "pass":
            out[key] = value
        elif kind == "unknown":
            unknown.append(key)
    if unknown:
        raise unknown_key_error(unknown)
    return out


def _data_options(config: dict[str, Any], base_dir: str, model_config: Any, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dataset_dir = _resolve(str(config.get("dataset_dir", "data")), base_dir)
    max_samples = _whole(config, "max_samples", None, positive=True)
    names = _names(config.get("dataset"))
    if not names:
        raise InvalidArgumentError("dataset", config.get("dataset"), "one or more dataset names of dataset_info.json")
    out["sft_datasets"] = _dataset_specs(names, dataset_dir, max_samples, notes)
    if config.get("eval_dataset"):
        out["sft_eval_datasets"] = _dataset_specs(_names(config["eval_dataset"]), dataset_dir, max_samples, notes)
    if config.get("val_size"):
        out["validation_split"] = config["val_size"]
    out["max_seq_length"] = _whole(config, "cutoff_len", 2048, positive=True)
    positions = getattr(model_config, "n_positions", None)  # learned absolute positions (GPT-2 style)
    if positions and out["max_seq_length"] > positions:
        notes.append(f"cutoff_len {out['max_seq_length']}: cut to the model's {positions} positions")
        out["max_seq_length"] = int(positions)
    out["bad_records"] = "skip"
    notes.append("bad_records: skip: malformed records are left out and counted, as LLaMA-Factory skips them")
    if config.get("template") is None:
        notes.append("cutoff_len: sequences are cut at the end (TRL); LLaMA-Factory shortens prompt and reply in "
                     "proportion (as here with a template)")
    if _flag(config, "use_dft_loss"):
        out["sft_loss"] = "dft"
    for key in ("train_on_prompt", "mask_history", "default_system", "enable_thinking"):
        if key in config:
            out[key] = config[key]
    if _flag(config, "packing") or _flag(config, "neat_packing"):
        out["packing"] = True
        notes.append("packing: TRL's best-fit packing, each sequence attending only to itself")
    return out


def _template_options(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    template = config.get("template")
    if template is None:
        if config.get("tool_format") is not None:
            raise _refuse("tool_format", config["tool_format"], "it needs a template")
        notes.append("no template: the tokenizer's own chat template, rendered whole by TRL (LLaMA-Factory parses "
                     "it into its own template, or falls back to `empty`)")
        return {}
    if template in TEMPLATES:
        out = {"template": template}
        if config.get("tool_format") is not None:
            out["tool_format"] = config["tool_format"]
        return out
    if MULTIMODAL_TEMPLATE.search(str(template)):
        raise _refuse("template", template, "a multimodal template (images, video, audio) has no text-only meaning")
    shipped = ", ".join(sorted(TEMPLATES))
    raise _refuse("template", template, f"it is not one of the templates written here: {shipped} (or give the "
                  "native chat_template key a .jinja file, for TRL to render)")


def _training_options(config: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """Evaluation, warmup, precision and DeepSpeed keys; the precision chosen for the hardware when the run starts."""
    out: dict[str, Any] = {}
    if "evaluation_strategy" in config:
        out["eval_strategy"] = config["evaluation_strategy"]
    if "warmup_ratio" in config and "warmup_steps" not in config:
        ratio = config["warmup_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise InvalidArgumentError("warmup_ratio", ratio, "a fraction of the training steps in [0, 1)")
        out["warmup_steps"] = float(ratio)  # a fraction of the steps in transformers 5
    out["precision"] = "auto"
    # LLaMA-Factory's bf16/fp16: autocast in that dtype, the weights loaded in it, trainable ones upcast.
    if _flag(config, "pure_bf16") or config.get("bf16"):
        out["model_dtype"] = "bfloat16"
        if config.get("bf16") and not _flag(config, "pure_bf16"):
            out["precision"] = "bf16"
    elif config.get("fp16"):
        out["model_dtype"] = "float16"
        out["precision"] = "fp16"
    if config.get("deepspeed"):
        # Found next to the config (or above it, as in LLaMA-Factory's tree), else as written: a run that
        # uses it checks it (one process without a GPU leaves it out, cli/config.py).
        path = str(config["deepspeed"])
        resolved = _resolve(path, base_dir)
        out["deepspeed"] = resolved if os.path.isfile(resolved) else path
    return out


def _checkpointing_options(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """LLaMA-Factory checkpoints activations unless ``disable_gradient_checkpointing: true``.

    It checkpoints only the layers with a trainable parameter (its
    ``get_custom_gradient_checkpointing_func``); transformers' ``activation_checkpointing`` with
    this library's ``activation_checkpointing`` plugin does the same: the frozen layers below run
    once, without a backward.
    """
    if _flag(config, "disable_gradient_checkpointing"):
        return {}
    if any(key in config for key in ("gradient_checkpointing", "activation_checkpointing")):
        notes.append("disable_gradient_checkpointing is unset, so LLaMA-Factory checkpoints activations whatever "
                     "gradient_checkpointing says: so does this run")
    out: dict[str, Any] = {"activation_checkpointing": True}
    if not any(key in config for key in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        reentrant = config.get("use_reentrant_gc", True)
        if not isinstance(reentrant, bool):
            raise InvalidArgumentError("use_reentrant_gc", reentrant, "true or false")
        out["activation_checkpointing_kwargs"] = {"use_reentrant": reentrant}
    notes.append("disable_gradient_checkpointing unset: activations are checkpointed in the layers that train, as "
                 "LLaMA-Factory does (set disable_gradient_checkpointing: true to trade memory for speed)")
    return out


def leave_idle_deepspeed_out(native: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``native`` without its DeepSpeed config when this run has one process and no GPU (said in ``notes``).

    LLaMA-Factory's examples name a DeepSpeed config that ZeRO needs several processes to use: on one
    CPU process it partitions nothing (and DeepSpeed on a CPU needs its own launcher setup). The
    translation keeps it, the same on every machine; the run that starts here leaves it out.
    """
    path = native.get("deepspeed")
    if not path or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return native
    import torch

    if torch.cuda.is_available():
        return native
    notes.append(f"deepspeed {path}: not used (one process, no GPU: ZeRO has nothing to partition across)")
    return {key: value for key, value in native.items() if key != "deepspeed"}


def render_translation(native: dict[str, Any], notes: list[str]) -> str:
    """The translation as a native YAML file, notes as comments."""
    import yaml

    lines = ["# LLaMA-Factory config translated; the equivalent native hf-llama-strategies YAML:"]
    lines += [f"#   note: {n}" for n in notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(native, sort_keys=False, allow_unicode=True)
