"""The layer-selection vocabulary: ``"all"``, ``"none"``, layer indices and Python slices.

``trainable_layers: "-2:"`` (the last two layers), ``":4"``, ``"0,5,10:12"``, ``"::2"``.
Negative indices count from the top. Shared by every option that selects decoder layers
(``trainable_layers`` in ``strategies/freezing.py``; gradual unfreezing and LISA read it), and
by nothing else: it knows no model and no plan.
"""

from __future__ import annotations

import re
from typing import Optional

from ..errors import InvalidArgumentError

ALL = "all"
NONE = "none"


_INT = r"[+-]?\d+"
_TOKEN_RE = re.compile(rf"^(?:(?P<index>{_INT})|(?P<start>{_INT})?:(?P<stop>{_INT})?(?::(?P<step>{_INT})?)?)$")
LAYER_SELECTION_SYNTAX = (
    "'all', 'none', or a comma list of layer indices and Python slices such as '-2:' (last two), "
    "':4' (first four), '0,5,10:12' or '::2'"
)


def parse_layer_selection(
    spec: str, num_layers: Optional[int], option: str = "trainable_layers"
) -> Optional[tuple[int, ...]]:
    """Resolve a layer selection to sorted layer indices.

    With ``num_layers=None`` only the syntax is checked and ``None`` is returned.
    Raises :class:`InvalidArgumentError` for bad syntax, and for indices or slice bounds
    outside the model's ``num_layers`` layers.
    """
    if not isinstance(spec, str):
        syntax = LAYER_SELECTION_SYNTAX
        if num_layers is not None:
            syntax += f" (the model has {num_layers} layers)"
        hint = None
        if isinstance(spec, int) and not isinstance(spec, bool):
            hint = (
                f"Write a string: '{-abs(spec)}:' for the last {abs(spec)} layers (LLaMA-Factory's "
                f"freeze_trainable_layers: {abs(spec)}) or '{spec}' for layer {spec} alone."
            )
        raise InvalidArgumentError(option, spec, syntax, hint)
    syntax = LAYER_SELECTION_SYNTAX
    if num_layers is not None:
        syntax += f" (the model has {num_layers} layers)"
    text = spec.strip().lower()
    if text == ALL:
        return None if num_layers is None else tuple(range(num_layers))
    if text == NONE:
        return None if num_layers is None else ()
    tokens = [t.strip() for t in text.split(",")]
    matches = []
    for token in tokens:
        m = _TOKEN_RE.match(token)
        if not token or m is None:
            raise InvalidArgumentError(option, spec, syntax, f"Cannot parse {token!r}.")
        if m.group("step") is not None and int(m.group("step")) == 0:
            raise InvalidArgumentError(option, spec, syntax, f"Slice step cannot be zero in {token!r}.")
        matches.append((token, m))
    if num_layers is None:
        return None

    selected: set[int] = set()
    valid = (
        f"an index or slice within the model's layers (it has {num_layers} layers: indices 0..{num_layers - 1}, "
        f"or -{num_layers}..-1 from the top)"
    )
    for token, m in matches:
        if m.group("index") is not None:
            index = int(m.group("index"))
            if not -num_layers <= index < num_layers:
                raise InvalidArgumentError(option, spec, valid, f"Layer {index} is out of range.")
            selected.add(index % num_layers)
            continue
        bounds = [None if m.group(g) is None else int(m.group(g)) for g in ("start", "stop", "step")]
        for bound in bounds[:2]:
            if bound is not None and not -num_layers <= bound <= num_layers:
                raise InvalidArgumentError(option, spec, valid, f"Slice bound {bound} in {token!r} is out of range.")
        chosen = range(num_layers)[slice(*bounds)]
        if len(chosen) == 0:
            raise InvalidArgumentError(option, spec, valid, f"Slice {token!r} selects no layer.")
        selected.update(chosen)
    return tuple(sorted(selected))


def selects_all(spec: object) -> bool:
    """True for ``"all"`` (any case and spacing): every layer, the default."""
    return isinstance(spec, str) and spec.strip().lower() == ALL


def selects_none(spec: object) -> bool:
    """True for ``"none"``: no decoder layer."""
    return isinstance(spec, str) and spec.strip().lower() == NONE


def format_layers(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def restricts_layers(trainable_layers: object, trainable_modules: Optional[str]) -> bool:
    """True when only some decoder layers or modules train (anything but every module of every layer)."""
    return not selects_all(trainable_layers) or trainable_modules is not None
