"""The plugin manager: built-in strategies and third-party plugins, registered alike.

As pytest does with its own plugins, the built-in strategies are modules listed by name
and registered through the same function as entry-point plugins; the core never branches
on a strategy's name.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional

import pluggy
from transformers.utils import logging

from . import hookspecs
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME

logger = logging.get_logger(__name__)

#: Built-in plugin modules, in registration order.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "hf_llama_strategies.anatomy",
    # the strategies, one module each
    "hf_llama_strategies.strategies.freezing",
    "hf_llama_strategies.strategies.precision",
    "hf_llama_strategies.strategies.layerwise_lr",
    "hf_llama_strategies.strategies.gradual_unfreezing",
    "hf_llama_strategies.strategies.lisa",
    "hf_llama_strategies.strategies.activation_checkpointing",
    "hf_llama_strategies.strategies.frozen_prefix_cache",
)


def _register(pm: pluggy.PluginManager, plugin: object, name: Optional[str] = None) -> None:
    if pm.is_registered(plugin) or (name is not None and pm.has_plugin(name)):
        return
    pm.register(plugin, name=name)


def get_plugin_manager(
    plugins: Iterable[object] = (), load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with the built-in strategies, installed plugins and ``plugins``.

    Args:
        plugins: plugin objects or modules passed in code; registered after the others,
            so with the same ordering marks they run last.
        load_entry_points: also load the plugins that installed packages declare in the
            ``hf_llama_strategies`` entry-point group.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        _register(pm, importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins:
        _register(pm, plugin)
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, object]]:
    """One entry per registered plugin: its name, where it comes from and its hooks."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        source = "built-in" if name in BUILTIN_PLUGINS else "in code"
        if dist is not None:
            source = f"{dist.project_name} {dist.version}"
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "source": source, "hooks": hooks})
    return rows
