"""``hf-llama-strategies export``: a base model with its LoRA adapter(s) merged in, saved as one model.

The config is LLaMA-Factory's merge YAML (``examples/merge_lora/*.yaml``: ``model_name_or_path``,
``adapter_name_or_path``, ``template``, ``export_dir``, ``export_size``...) or the same keys
natively. The adapters are merged in order with PEFT's ``merge_and_unload``; the model is saved
in the dtype it loads in (``model_dtype``), in shards of ``export_size`` GB, with the tokenizer
the training run saved beside the last adapter (else the base model's, prepared for
``template`` as the training run prepared it). The model is written to a folder next to
``export_dir`` and renamed into place at the end: a run that fails leaves nothing half written,
and an ``export_dir`` that already holds files is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from transformers import HfArgumentParser

from ..errors import CliError, InvalidArgumentError
from .config import check_config_types


@dataclass
class ExportArguments:
    """Keys of ``export`` (LLaMA-Factory's names)."""

    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "The base model the adapters train."})
    adapter_name_or_path: Optional[list[str]] = field(
        default=None, metadata={"help": "The adapter folder(s), merged in order (comma-separated)."}
    )
    export_dir: Optional[str] = field(default=None, metadata={"help": "Where the merged model is written (new)."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to save with it. Default: the last adapter's, else the base's."}
    )
    template: Optional[str] = field(
        default=None, metadata={"help": "LLaMA-Factory template the base tokenizer is prepared for (stop words, EOS)."}
    )
    model_dtype: str = field(default="auto", metadata={"help": "dtype to merge and save in (auto: as saved)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with code from their repository."})
    export_size: int = field(default=5, metadata={"help": "Largest shard, in GB."})
    export_device: str = field(default="cpu", metadata={"help": "cpu or auto (the merge runs where the model loads)."})
    export_legacy_format: bool = field(default=False, metadata={"help": "Only false: safetensors are written."})
    finetuning_type: str = field(default="lora", metadata={"help": "Only lora (LLaMA-Factory's key)."})


class _Parser(HfArgumentParser):
    def __init__(self) -> None:
        super().__init__([ExportArguments], allow_abbrev=False)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def parse_export_config(config: dict[str, Any], overrides: Sequence[str] = ()) -> ExportArguments:
    """The export keys of ``config`` and the command line, checked (one line naming a bad key or value)."""
    from ..training.peft import as_list

    known = [f.name for f in dataclasses.fields(ExportArguments)]
    unknown = [k for k in config if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CliError(f"unknown export key {unknown[0]!r}{hint} Keys: {', '.join(known)}.")
    config = check_config_types(config, [ExportArguments])
    parser = _Parser()
    parser.set_defaults(**config)
    args, remaining = parser.parse_args_into_dataclasses(args=list(overrides), return_remaining_strings=True)
    if remaining:
        raise CliError(f"unknown export option {remaining[0]!r}. Keys: {', '.join(known)}.")
    args.adapter_name_or_path = as_list(args.adapter_name_or_path)
    _check(args)
    return args


def _check(args: ExportArguments) -> None:
    for option in ("model_name_or_path", "export_dir"):
        if not getattr(args, option):
            raise InvalidArgumentError(option, getattr(args, option), "a path (export needs a base model and a new "
                                       "folder to write the merged model to)")
    if not args.adapter_name_or_path:
        raise InvalidArgumentError("adapter_name_or_path", None, "one or more PEFT adapter folders to merge")
    for path in args.adapter_name_or_path:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise InvalidArgumentError("adapter_name_or_path", path, "a folder holding a PEFT adapter "
                                       "(adapter_config.json)")
    if args.finetuning_type != "lora":
        raise InvalidArgumentError("finetuning_type", args.finetuning_type, "lora (a full or freeze run's output "
                                   "is already a whole model)")
    if args.export_legacy_format:
        raise InvalidArgumentError("export_legacy_format", True, "false (safetensors)")
    if args.export_device not in ("cpu", "auto"):
        raise InvalidArgumentError("export_device", args.export_device, "cpu or auto")
    if isinstance(args.export_size, bool) or not isinstance(args.export_size, int) or args.export_size < 1:
        raise InvalidArgumentError("export_size", args.export_size, "a whole number of GB, at least 1")
    if os.path.isdir(args.export_dir) and os.listdir(args.export_dir):
        raise InvalidArgumentError("export_dir", args.export_dir, "a new or empty folder (nothing is overwritten)")
    if os.path.exists(args.export_dir) and not os.path.isdir(args.export_dir):
        raise InvalidArgumentError("export_dir", args.export_dir, "a folder, not a file")


def _tokenizer(args: ExportArguments) -> Any:
    """The tokenizer the adapter trained with: saved beside it, else the base's prepared for ``template``."""
    from transformers import AutoTokenizer

    from ..data.chat_templates import build_chat_template
    from ..data.template_data import template_spec
    from ..data.template_tokens import prepare_tokenizer

    last = args.adapter_name_or_path[-1]
    saved = os.path.isfile(os.path.join(last, "tokenizer_config.json"))
    source = args.tokenizer_name_or_path or (last if saved else args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    if args.template is not None and source != last:
        from ..data.sft import SFTArguments

        spec = template_spec(SFTArguments(template=args.template))
        prepare_tokenizer(spec, tokenizer)
        if not tokenizer.chat_template or spec.replace_jinja_template:
            tokenizer.chat_template = build_chat_template(args.template)
    return tokenizer


def run_export(config: dict[str, Any], overrides: Sequence[str] = ()) -> str:
    """Merge the adapters into the base model and write it to ``export_dir``; returns that folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..training.peft import merge_adapters

    args = parse_export_config(config, overrides)
    tokenizer = _tokenizer(args)
    dtype = "auto" if args.model_dtype == "auto" else getattr(torch, args.model_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=dtype, trust_remote_code=args.trust_remote_code,
        device_map="auto" if args.export_device == "auto" else None,
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # The training run grew the embeddings for the tokens its template added (64-row multiples).
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    model = merge_adapters(model, args.adapter_name_or_path)
    parent = os.path.dirname(os.path.abspath(args.export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(staging, max_shard_size=f"{args.export_size}GB")
        tokenizer.save_pretrained(staging)
        if os.path.isdir(args.export_dir):
            os.rmdir(args.export_dir)  # empty, checked above
        os.replace(staging, args.export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return args.export_dir
