"""The plugin manager: built-in strategies and third-party plugins, registered alike.

As pytest does with its own plugins, the built-in strategies are modules listed by name
and registered through the same function as entry-point plugins; the core never branches
on a strategy's name. A run has one manager (:attr:`RunContext.plugin_manager`): the default
one (built-in and installed plugins, built once and cached, :func:`default_plugin_manager`)
or, when plugins are passed in code, one of its own (:func:`plugin_manager_for`).

Call order: pluggy calls the implementations of a hook from the last registered to the
first, ``tryfirst``/``trylast`` marks aside. Plugins passed in code are registered last, so
with the same marks they run *first*, before the installed and the built-in ones (measured for
``hfls_plan_parameters``: ``freezing`` (``tryfirst``), the plugin passed in code, the installed
ones, ``layerwise_lr``, then ``gradual_unfreezing`` and ``lisa`` (``trylast``)).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import types
from typing import Any, Callable, Iterable, Optional

import pluggy
from transformers.utils import logging

from . import hookspecs
from .errors import PluginError, StrategyError
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME

logger = logging.get_logger(__name__)

#: Built-in plugin modules, in registration order: the core services' default answers
#: (anatomy, hardware probe), then the strategies. The only place the core names a strategy.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "hf_llama_strategies.anatomy",
    "hf_llama_strategies.precision",
    # the strategies, one module each
    "hf_llama_strategies.strategies.freezing",
    "hf_llama_strategies.strategies.precision",
    "hf_llama_strategies.strategies.layerwise_lr",
    "hf_llama_strategies.strategies.gradual_unfreezing",
    "hf_llama_strategies.strategies.lisa",
    "hf_llama_strategies.strategies.activation_checkpointing",
    "hf_llama_strategies.strategies.frozen_prefix_cache",
)


def _display_name(plugin: object, name: Optional[str]) -> str:
    """How messages name a plugin: its entry-point or module name, else its class name."""
    if name is not None and not name.isdigit():
        return name
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return getattr(plugin, "__qualname__", None) or type(plugin).__qualname__


def _check_hook_names(plugin: object, display: str) -> None:
    """A ``hfls_`` attribute that names no hook is a typo: refused at registration, with the closest hook."""
    known = {n for n in dir(hookspecs) if n.startswith("hfls_")}
    for attr in dir(plugin):
        if not attr.startswith("hfls_") or attr in known or not callable(getattr(plugin, attr, None)):
            continue
        close = difflib.get_close_matches(attr, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; hooks: {', '.join(sorted(known))}."
        raise PluginError(f"plugin {display!r} defines {attr!r}, which is not a hook of hf-llama-strategies{hint}")


def _check_answer(hook: str, display: str, result: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a third-party answer of the wrong type or about things that do not exist."""
    where = f"plugin {display!r} (hook {hook})"
    if result is None:
        return
    if hook == "hfls_model_anatomy":
        from .anatomy import ModelAnatomy

        if not isinstance(result, ModelAnatomy):
            raise PluginError(f"{where} returned a {type(result).__name__}, expected a ModelAnatomy or None.")
        modules = dict(kwargs["model"].named_modules())
        paths = [result.layers_path, *result.embedding_paths, *result.norm_paths, *result.head_paths]
        missing = [p for p in paths if p not in modules]
        if missing:
            raise PluginError(f"{where}: module path {missing[0]!r} does not exist in {type(kwargs['model']).__name__}.")
        layers = modules[result.layers_path]
        count = len(layers) if hasattr(layers, "__len__") else None
        if count is None or result.num_layers != count or result.num_layers < 1:
            raise PluginError(
                f"{where}: num_layers={result.num_layers!r}, but {result.layers_path!r} holds {count} layers."
            )
    elif hook == "hfls_active_parameters":
        if isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
            raise PluginError(f"{where} returned a {type(result).__name__}, expected parameter names (a set or list).")
        names = list(result)
        wrong = [n for n in names if not isinstance(n, str)]
        if wrong:
            raise PluginError(f"{where} returned {wrong[0]!r}, not a parameter name.")
        unknown = [n for n in names if n not in kwargs["plan"].decisions]
        if unknown:
            raise PluginError(f"{where} returned the unknown parameter name {unknown[0]!r}.")


def _guard(function: Callable[..., Any], hook: str, display: str, argnames: tuple[str, ...]) -> Callable[..., Any]:
    """``function`` whose failures and wrong answers name the plugin and the hook."""

    @functools.wraps(function)
    def guarded(*args: Any) -> Any:
        try:
            result = function(*args)
        except StrategyError:
            raise  # a deliberate refusal of the user's input, worded by the plugin
        except Exception as exc:
            raise PluginError(f"plugin {display!r} failed in {hook}: {type(exc).__name__}: {exc}") from exc
        _check_answer(hook, display, result, dict(zip(argnames, args)))
        return result

    return guarded


def _register(pm: pluggy.PluginManager, plugin: object, name: Optional[str] = None, trusted: bool = False) -> None:
    if pm.is_registered(plugin) or (name is not None and pm.has_plugin(name)):
        return
    display = _display_name(plugin, name)
    _check_hook_names(plugin, display)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {display!r} cannot be registered: {exc}") from None
    if trusted:
        return
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not impl.hookwrapper and not impl.wrapper:
                impl.function = _guard(impl.function, caller.name, display, tuple(impl.argnames))


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load the ``hf_llama_strategies`` entry points one by one: a broken one is recorded, not fatal here."""
    broken: dict[str, str] = getattr(pm, "hfls_broken", {})
    sources: dict[str, str] = getattr(pm, "hfls_sources", {})
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        try:
            _register(pm, ep.load(), name=ep.name)
        except Exception as exc:
            broken[ep.name] = f"{source}: {type(exc).__name__}: {exc}"
            continue
        sources[ep.name] = source
    pm.hfls_broken = broken  # type: ignore[attr-defined]
    pm.hfls_sources = sources  # type: ignore[attr-defined]


def get_plugin_manager(
    plugins: Iterable[object] = (), load_entry_points: bool = True, strict: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with the built-in strategies, installed plugins and ``plugins``.

    Args:
        plugins: plugin objects or modules passed in code; registered after the others,
            so with the same ordering marks they run first (pluggy calls the last
            registered implementation first). ``pm.hfls_code_plugins`` lists them.
        load_entry_points: also load the plugins that installed packages declare in the
            ``hf_llama_strategies`` entry-point group.
        strict: refuse to go on when an installed plugin cannot be loaded (``False``: record
            it in ``pm.hfls_broken``, as the ``plugins`` command lists it).

    Raises:
        PluginError: a plugin cannot be loaded or registered (a hook-like name with a typo),
            naming it.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.hfls_broken = {}  # type: ignore[attr-defined]
    pm.hfls_sources = {}  # type: ignore[attr-defined]
    for module_name in BUILTIN_PLUGINS:
        _register(pm, importlib.import_module(module_name), name=module_name, trusted=True)
    if load_entry_points:
        _load_entry_points(pm)
        if strict and pm.hfls_broken:  # type: ignore[attr-defined]
            name, why = next(iter(pm.hfls_broken.items()))  # type: ignore[attr-defined]
            raise PluginError(
                f"installed plugin {name!r} cannot be loaded ({why}). Fix or uninstall it; "
                "`hf-llama-strategies plugins` lists what loads."
            )
    code_plugins = []
    for plugin in plugins:
        _register(pm, plugin)
        code_plugins.append(plugin)
    pm.hfls_code_plugins = tuple(code_plugins)  # type: ignore[attr-defined]
    return pm


_default: Optional[tuple[tuple[tuple[str, str], ...], pluggy.PluginManager]] = None


def _installed_key() -> tuple[tuple[str, str], ...]:
    return tuple(
        (ep.name, str(getattr(ep, "value", ""))) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    )


def default_plugin_manager() -> pluggy.PluginManager:
    """The manager of the built-in and installed plugins, built once (again when the installed set changes).

    ``StrategyArguments`` validates against it at construction, and a run without plugins
    passed in code uses it. It refuses ``register``: plugins passed to
    :func:`get_plugin_manager` (or ``strategy_plugins=``) get a manager of their own, so no
    plugin leaks from one run into the next.

    Raises:
        PluginError: an installed plugin cannot be loaded.
    """
    global _default
    key = _installed_key()
    if _default is None or _default[0] != key:
        pm = get_plugin_manager()

        def refuse(plugin: object, name: Optional[str] = None) -> None:
            raise PluginError(
                f"cannot register {_display_name(plugin, name)!r} into the default plugin manager, which every run "
                "without plugins of its own shares: pass it as strategy_plugins=[...] (or plugins=[...]), which "
                "gives that run a manager of its own."
            )

        pm.register = refuse  # type: ignore[method-assign]
        _default = (key, pm)
    return _default[1]


def plugin_manager_for(plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """The manager of a run given ``plugins`` in code: the default one without any, else a new one."""
    plugins = tuple(plugins)
    return get_plugin_manager(plugins) if plugins else default_plugin_manager()


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, object]]:
    """One entry per registered plugin: its name, where it comes from and its hooks."""
    sources = getattr(pm, "hfls_sources", {})
    rows = []
    for name, plugin in pm.list_name_plugin():
        source = "built-in" if name in BUILTIN_PLUGINS else sources.get(name, "in code")
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "source": source, "hooks": hooks})
    for name, why in getattr(pm, "hfls_broken", {}).items():
        rows.append({"name": name, "source": f"BROKEN, not loaded: {why}", "hooks": []})
    return rows
