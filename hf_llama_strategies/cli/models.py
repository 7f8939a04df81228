"""The model and tokenizer of a CLI run: loaded with weights, or built from a config (on the meta device, ``plan``).

A GGUF model (``gguf_file``, resolved to its path by ``parse_config``) loads from the ordinary
folder it converts into (:mod:`.gguf`); ``plan`` reads its config alone.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from ..data.local import CAUSAL_LM, SEQ_CLS
from ..errors import InvalidArgumentError
from ..training.checkpoints import weights_problem
from .config import ModelArguments
from .gguf import gguf_model_folder, load_gguf_config


def _config_source(model_args: ModelArguments) -> str:
    return str(model_args.model_config or model_args.model_name_or_path)


def weights_source(model_args: ModelArguments) -> str:
    """Where the weights load from: ``model_name_or_path``, or the folder its GGUF file converts into (cached)."""
    if model_args.gguf_file:
        option = "gguf_file" if model_args.gguf_file != model_args.model_name_or_path else "model_name_or_path"
        return gguf_model_folder(model_args.gguf_file, option=option)
    return str(model_args.model_name_or_path)


def load_model_config(model_args: ModelArguments) -> Any:
    """The model's ``PretrainedConfig`` from ``model_config``, ``model_name_or_path`` or the GGUF file."""
    from transformers import AutoConfig

    if model_args.gguf_file and model_args.model_config is None:
        return load_gguf_config(model_args.gguf_file)
    source = _config_source(model_args)
    option = "model_config" if model_args.model_config else "model_name_or_path"
    if model_args.model_config and not os.path.exists(source):
        raise InvalidArgumentError(option, source, "a config.json file or a directory holding one", "No such path.")
    _check_local_model_path(option, source)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            option, source, "a model directory, a config.json or a reachable Hub id", str(exc)
        ) from None


def looks_like_a_path(value: str) -> bool:
    """A value that can only be a local path, never a Hub id (``org/name``): absolute, relative, or deeper."""
    return (os.path.isabs(value) or value.startswith(("./", "../", "~")) or value.count("/") > 1
            or value.endswith("/") or (os.sep != "/" and os.sep in value))


def _check_local_model_path(option: str, source: str) -> None:
    """A local model folder that is missing, or holds no config.json, in this library's words (not the Hub's)."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")) and option == "model_name_or_path":
            raise InvalidArgumentError(option, source, "a model directory", "It holds no config.json.")
        return
    if os.path.exists(source):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if looks_like_a_path(source) or offline:
        hint = "No such directory." if looks_like_a_path(source) else (
            "No such directory here, and HF_HUB_OFFLINE is set (no Hub lookup).")
        raise InvalidArgumentError(option, source, "a model directory or a Hub id", hint)


def check_model_weights(path: str) -> None:
    """Refuse a local model folder whose weights are missing or not whole, before ``from_pretrained`` reads them.

    Raises:
        InvalidArgumentError: naming ``model_name_or_path``, the folder and the file.
    """
    if not os.path.isdir(path):
        return
    problem = weights_problem(path, allow_other_layouts=False)
    if problem:
        raise InvalidArgumentError(
            "model_name_or_path", path, "a model directory with whole weights",
            f"In it: {problem}. To train from fresh weights instead, give model_config.",
        )


def _auto_model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == SEQ_CLS else AutoModelForCausalLM


def task_from_config(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    return SEQ_CLS if any("SequenceClassification" in a for a in architectures) else CAUSAL_LM


def _dtype(model_args: ModelArguments) -> Any:
    import torch

    return "auto" if model_args.model_dtype == "auto" else getattr(torch, model_args.model_dtype)


def build_model(model_args: ModelArguments, config: Any, task: str, meta: bool = False) -> Any:
    """The model for ``task``: loaded with weights, or built from the config (on the meta device for ``meta``)."""
    import torch

    auto = _auto_model_class(task)
    if model_args.model_config is not None or meta:
        dtype = _dtype(model_args)
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if meta:
            with torch.device("meta"):
                return auto.from_config(config, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
        torch.manual_seed(0)
        return auto.from_config(config, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
    # A GGUF model loads from the folder it converts into (once); that folder is ours and whole.
    path = weights_source(model_args)
    if not model_args.gguf_file:
        check_model_weights(path)
    try:
        return auto.from_pretrained(
            path, config=config, dtype=_dtype(model_args), trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as exc:  # the Hub's or a file's error, named as this option's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgumentError("model_name_or_path", path, "a model directory or a reachable Hub id",
                                   first[:300]) from None


def load_tokenizer(model_args: ModelArguments, pad_with_eos: bool = True) -> Any:
    """The tokenizer of ``model_args``; ``pad_with_eos``: one without a pad token pads with EOS."""
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name_or_path
    if source is None:
        source = weights_source(model_args) if model_args.gguf_file else _config_source(model_args)
    if source and os.path.isfile(source):
        source = os.path.dirname(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            "tokenizer_name_or_path", source, "a tokenizer directory or a reachable Hub id", str(exc)
        ) from None
    if tokenizer.pad_token is None and pad_with_eos:
        # Llama tokenizers ship without a pad token; EOS padding is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fit_embeddings(model: Any, tokenizer: Any) -> Optional[str]:
    """Grow the model's embeddings (and head) to the tokenizer's vocabulary; a note saying so, or None.

    As LLaMA-Factory's ``resize_vocab``: rows for a multiple of 64 tokens, each new row the mean
    of the existing rows plus Gaussian noise of standard deviation ``1/sqrt(hidden size)``.
    """
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return None
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    new_rows = model.get_input_embeddings().weight.shape[0]
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    outputs = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None and not tied:
        outputs.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in outputs:
            added = new_rows - rows
            mean = weight[:rows].mean(dim=0, keepdim=True)
            noise = torch.empty_like(weight[rows:]).normal_(mean=0.0, std=1.0 / math.sqrt(weight.shape[1]))
            weight[rows:] = mean + noise
    return (f"embeddings resized from {rows} to {new_rows} rows for the {len(tokenizer) - rows} token(s) added to the "
            f"vocabulary ({added} new rows: their mean plus noise, as LLaMA-Factory's resize_vocab)")
