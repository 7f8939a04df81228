"""GGUF model files (llama.cpp's format): checked, converted once into an ordinary model folder, cached.

transformers reads a GGUF file's config, tokenizer and weights (dequantized) through
``from_pretrained(folder, gguf_file=name)``, but each of the three parses the whole file again
(about 40 s for a 135M model on two cores), and the model it gives refuses ``save_pretrained``
(it is marked as quantized). So the first use of a file converts it into an ordinary safetensors
folder (config, weights, tokenizer with its chat template) under
``$HF_HOME/hf_llama_strategies/gguf/``, written into a temporary folder and renamed into place;
later runs load that folder in about a second, as any model folder. A changed file (another
size or modification time) converts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from ..errors import InvalidArgumentError, StrategyError

GGUF_INSTALL = 'pip install "hf-llama-strategies[gguf]"'
#: What a converted folder holds besides the model files: where it came from (read to recognise it).
SOURCE_FILE = "gguf_source.json"
_MAGIC = b"GGUF"


class GgufCacheError(StrategyError):
    """The converted model could not be written to the cache (a full or read-only disk): nothing else was."""


def is_gguf_name(value: Any) -> bool:
    """Whether ``value`` names a GGUF file (by its extension)."""
    return isinstance(value, str) and value.lower().endswith(".gguf")


def resolve_gguf_file(model_name_or_path: Optional[str], gguf_file: Optional[str]) -> Optional[str]:
    """The GGUF file a model's keys name, as a local path; None when they name none.

    As in transformers, ``gguf_file`` is a file name inside ``model_name_or_path``: a folder, or a
    Hub repository it is downloaded from. Alone (or naming an existing file) it is a path of its
    own, and a ``model_name_or_path`` ending in ``.gguf`` is that file.

    Raises:
        InvalidArgumentError: the two keys name different files, or the download fails.
    """
    if gguf_file is None:
        return model_name_or_path if is_gguf_name(model_name_or_path) else None
    if model_name_or_path is None:
        return gguf_file
    if os.path.isdir(model_name_or_path):
        return os.path.join(model_name_or_path, gguf_file)
    if os.path.isfile(model_name_or_path):
        if os.path.isfile(gguf_file) and os.path.samefile(model_name_or_path, gguf_file):
            return gguf_file
        raise InvalidArgumentError(
            "gguf_file", gguf_file, f"a file inside model_name_or_path, which is a folder or a Hub repository "
            f"(here it is the file {model_name_or_path!r})", "Give the .gguf file as one of the two keys.",
        )
    if os.path.isfile(gguf_file):
        return gguf_file
    return download_gguf(model_name_or_path, gguf_file)


def download_gguf(repo: str, filename: str, option: str = "gguf_file") -> str:
    """``filename`` of the Hub repository ``repo``, downloaded (or from the Hub cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # offline, no such repository or file, no access: all the user's to fix
        raise InvalidArgumentError(
            option, filename, f"a GGUF file of the Hub repository {repo!r} (or a local path)",
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        ) from None


def require_gguf(option: str, path: str) -> None:
    """The ``gguf`` package is installed, or one line saying how to install it."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            option, path, "a GGUF file, read with the `gguf` package", f"It is not installed: {GGUF_INSTALL}."
        ) from None


def check_gguf_file(path: str, option: str = "gguf_file") -> None:
    """A readable, whole GGUF file, or one line naming it and what is wrong (before anything is written)."""
    if not os.path.exists(path):
        raise InvalidArgumentError(option, path, "an existing .gguf file", "No such file.")
    if not os.path.isfile(path):
        raise InvalidArgumentError(option, path, "a .gguf file", "It is a directory.")
    require_gguf(option, path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InvalidArgumentError(option, path, "a readable .gguf file", exc.strerror) from None
    if head != _MAGIC:
        raise InvalidArgumentError(option, path, "a GGUF file", "It does not start with the GGUF magic bytes.")
    import gguf

    try:
        # Parses the metadata and maps every tensor: a truncated or damaged file fails here.
        gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as exc:
        raise InvalidArgumentError(
            option, path, "a whole GGUF file", f"It cannot be read (truncated or damaged?): {exc}."
        ) from None


def gguf_cache_root() -> str:
    """``$HF_HOME/hf_llama_strategies/gguf``: where converted GGUF files are kept."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_llama_strategies", "gguf")


def _identity(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_folder(path: str, root: Optional[str] = None) -> str:
    """The folder ``path`` converts into: named after the file, keyed by its place, size and time."""
    identity = _identity(path)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(root or gguf_cache_root(), f"{stem}-{key}")


def cached_model_folder(path: str, root: Optional[str] = None) -> Optional[str]:
    """The converted folder of ``path`` when a whole one is cached, else None."""
    try:
        folder = cache_folder(path, root)
        return folder if _whole(folder, _identity(path)) else None
    except OSError:  # no such file: nothing cached for it
        return None


def _whole(folder: str, identity: Optional[dict[str, Any]] = None) -> bool:
    """Whether ``folder`` holds a finished conversion (of ``identity``), every file at its recorded size.

    A file cut short later (a disk fault) makes the folder count as absent: it converts again.
    """
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as fh:
            record = json.load(fh)
        sizes = record["files"]
        if identity is not None and record["source"] != identity:
            return False
        return all(os.path.getsize(os.path.join(folder, name)) == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def gguf_model_folder(
    path: str, root: Optional[str] = None, option: str = "gguf_file", announce: Callable[[str], None] = print,
) -> str:
    """The ordinary model folder of the GGUF file ``path``: the cached one, or converted now and cached.

    Raises:
        InvalidArgumentError: the file is not a GGUF model transformers can load (naming it).
        GgufCacheError: the converted folder could not be written (a machine fault: nothing else was).
    """
    folder = cached_model_folder(path, root)
    if folder is not None:
        return folder
    check_gguf_file(path, option)
    folder = cache_folder(path, root)
    announce(f"converting {path} into an ordinary model folder (once; kept in {folder})")
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as exc:
        raise _cache_error(path, parent, exc) from None
    try:
        convert_gguf(path, staging, option)
        _publish(staging, folder)
    except OSError as exc:
        raise _cache_error(path, parent, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _publish(staging: str, folder: str) -> None:
    """Rename the finished folder into place; a whole one another process put there first wins."""
    _readable(staging)
    try:
        os.rename(staging, folder)
    except OSError:
        if _whole(folder):
            return
        # A damaged conversion of this same file (a conversion killed before its rename leaves
        # none): ours, under our cache root, replaced.
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)


def _readable(folder: str) -> None:
    """Folder and files as the user's umask makes new ones (``mkdtemp`` gives 0700), for a shared HF_HOME."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _cache_error(path: str, where: str, exc: OSError) -> GgufCacheError:
    return GgufCacheError(
        f"could not write the converted model of {path} under {where}: {exc.strerror or exc}. Nothing else was "
        "written; free space there, or set HF_HOME to a writable place with room for it."
    )


def convert_gguf(path: str, out: str, option: str = "gguf_file") -> None:
    """Write the GGUF file ``path`` into ``out`` as an ordinary model folder (safetensors, tokenizer, template)."""
    tokenizer, model = _load_gguf(path, option)
    # transformers marks a GGUF model as quantized even when its weights are plain tensors,
    # and refuses to save it; the dequantized model is an ordinary one.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))}
    # Written last, with every file's size: what `_whole` reads to trust the folder.
    with open(os.path.join(out, SOURCE_FILE), "w", encoding="utf-8") as fh:
        json.dump({"source": _identity(path), "architecture": model.config.model_type, "files": sizes}, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _load_gguf(path: str, option: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_dense_weights())
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise unloadable_gguf(option, path, exc) from None
    return tokenizer, model


def _dense_weights() -> dict[str, Any]:
    """``from_pretrained`` keywords that give plain float weights (no GGUF matmul kernels kept)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers that dequantizes GGUF files always
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def unloadable_gguf(option: str, path: str, exc: BaseException) -> InvalidArgumentError:
    """A GGUF file transformers cannot load (its architecture, a tensor type), as one line naming the file."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as archs
    except ImportError:
        archs = []
    from ..errors import format_choices

    known = f" ({format_choices(sorted(archs), limit=12)})" if archs else ""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InvalidArgumentError(
        option, path, f"a GGUF model of an architecture transformers loads{known}", f"transformers: {first}"
    )


def load_gguf_config(path: str, option: str = "gguf_file") -> Any:
    """The model config of a GGUF file: the cached folder's, else read from the file (no weights)."""
    from transformers import AutoConfig

    folder = cached_model_folder(path)
    if folder is not None:
        return AutoConfig.from_pretrained(folder)
    check_gguf_file(path, option)
    directory, name = os.path.split(os.path.abspath(path))
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError, OSError) as exc:
        raise unloadable_gguf(option, path, exc) from None
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    return config
