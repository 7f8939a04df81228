"""The plugin manager: built-in strategies and third-party plugins, registered alike.

As pytest does with its own plugins (``PytestPluginManager``, ``default_plugins``), the
built-in strategies are modules listed by name and registered through the same method as
entry-point plugins; the core never branches on a strategy's name. A run has one manager
(``RunContext.plugin_manager``): the shared default one (built-in and installed plugins,
built once and cached, :func:`default_plugin_manager`) or, when plugins are passed in code,
one of its own (:func:`plugin_manager_for`).

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
import inspect
import types
from typing import Any, Callable, Iterable, Optional

import pluggy

from ..errors import PluginError, StrategyError
from . import hookspecs
from .anatomy import ModelAnatomy
from .hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME

#: Built-in plugin modules, in registration order: the core services' default answers, then
#: the strategies. The only place the core names a strategy, as text, as pytest lists its own.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "hf_llama_strategies.core.builtin_hooks",
    "hf_llama_strategies.strategies.freezing",
    "hf_llama_strategies.strategies.mixed_precision",
    "hf_llama_strategies.strategies.layerwise_lr",
    "hf_llama_strategies.strategies.gradual_unfreezing",
    "hf_llama_strategies.strategies.lisa",
    "hf_llama_strategies.strategies.activation_checkpointing",
    "hf_llama_strategies.strategies.frozen_prefix_cache.plugin",
)
BUILT_IN = "built-in"
IN_CODE = "in code"
_HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("hfls_"))


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with the hooks of hf-llama-strategies, and where each plugin comes from.

    Attributes:
        sources: plugin name -> where it comes from (``"built-in"``, ``"<distribution> <version>"``
            for an installed plugin, ``"in code"``).
        broken: entry-point name -> why the installed plugin could not be loaded.
        code_plugins: the plugins passed in code, as given.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, str] = {}
        self.broken: dict[str, str] = {}
        self.code_plugins: tuple[object, ...] = ()
        self._registered: dict[int, object] = {}  # id(plugin as given) -> what is registered for it
        self._shared = False

    def register(self, plugin: object, name: Optional[str] = None) -> Optional[str]:
        """pluggy's ``register``; refused on the shared default manager (a plugin would leak into every run)."""
        if self._shared:
            raise PluginError(
                f"cannot register {_display_name(plugin, name)!r} into the default plugin manager, which every run "
                "without plugins of its own shares: pass it as strategy_plugins=[...] (or plugins=[...]), which "
                "gives that run a manager of its own."
            )
        return super().register(plugin, name)

    # pluggy's lookups take and give the plugin as it was given, not the guard registered in its place.

    def get_plugin(self, name: str) -> Any:
        """The plugin registered as ``name``, as it was given."""
        return _given_plugin(super().get_plugin(name))

    def get_plugins(self) -> set[Any]:
        """Every registered plugin, as given."""
        return {_given_plugin(p) for p in super().get_plugins()}

    def list_name_plugin(self) -> list[tuple[str, Any]]:
        """``(name, plugin as given)`` of every registered plugin."""
        return [(name, _given_plugin(p)) for name, p in super().list_name_plugin()]

    def is_registered(self, plugin: object) -> bool:
        """Whether ``plugin`` (as given) is registered."""
        return super().is_registered(self._registered.get(id(plugin), plugin))

    def get_name(self, plugin: object) -> Optional[str]:
        """The name ``plugin`` (as given) is registered under."""
        return super().get_name(self._registered.get(id(plugin), plugin))

    def get_hookcallers(self, plugin: object) -> Any:
        """The hook callers ``plugin`` (as given) implements."""
        return super().get_hookcallers(self._registered.get(id(plugin), plugin))

    def unregister(self, plugin: Optional[object] = None, name: Optional[str] = None) -> Any:
        """pluggy's ``unregister``, of the plugin as given."""
        if plugin is None and name is not None:
            plugin = self.get_plugin(name)
        registered = self._registered.pop(id(plugin), plugin) if plugin is not None else None
        return _given_plugin(super().unregister(registered, name))

    def add_plugin(self, plugin: object, name: Optional[str] = None, source: str = IN_CODE) -> None:
        """Register ``plugin`` once, refusing a misspelt hook name.

        A plugin that is not built in is registered wrapped: its hook functions fail with a
        :class:`PluginError` that names it and the hook, and a wrong answer to a ``firstresult``
        hook is refused the same way.
        """
        if self.is_registered(plugin) or (name is not None and self.has_plugin(name)):
            return
        display = _display_name(plugin, name)
        _check_hook_names(plugin, display)
        registered = plugin if source == BUILT_IN else _GuardedPlugin(plugin, display)
        try:
            name = self.register(registered, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {display!r} cannot be registered: {exc}") from None
        self._registered[id(plugin)] = registered
        self.sources[name or display] = source

    def load_installed(self) -> None:
        """Load the ``hf_llama_strategies`` entry points one by one; a broken one is recorded in :attr:`broken`."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.has_plugin(ep.name) or self.is_blocked(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            try:
                self.add_plugin(ep.load(), name=ep.name, source=source)
            except Exception as exc:
                self.broken[ep.name] = f"{source}: {type(exc).__name__}: {exc}"

    def refuse_broken(self) -> None:
        """Raise :class:`PluginError` naming the first installed plugin that could not be loaded."""
        if self.broken:
            name, why = next(iter(self.broken.items()))
            raise PluginError(
                f"installed plugin {name!r} cannot be loaded ({why}). Fix or uninstall it; "
                "`hf-llama-strategies plugins` lists what loads."
            )

    def share(self) -> None:
        """From now on :meth:`register` refuses: this manager is shared by every run without plugins of its own."""
        self._shared = True


def get_plugin_manager(
    plugins: Iterable[object] = (), load_entry_points: bool = True, strict: bool = True
) -> PluginManager:
    """A new plugin manager with the built-in strategies, installed plugins and ``plugins``.

    Args:
        plugins: plugin objects or modules passed in code; registered after the others,
            so with the same ordering marks they run first. ``pm.code_plugins`` lists them.
        load_entry_points: also load the plugins that installed packages declare in the
            ``hf_llama_strategies`` entry-point group.
        strict: refuse to go on when an installed plugin cannot be loaded (``False``: record
            it in ``pm.broken``, as the ``plugins`` command lists it).

    Raises:
        PluginError: a plugin cannot be loaded or registered (a hook-like name with a typo),
            naming it.
    """
    pm = PluginManager()
    for module_name in BUILTIN_PLUGINS:
        pm.add_plugin(importlib.import_module(module_name), name=module_name, source=BUILT_IN)
    if load_entry_points:
        pm.load_installed()
        if strict:
            pm.refuse_broken()
    given = tuple(plugins)
    for plugin in given:
        pm.add_plugin(plugin)
    pm.code_plugins = given
    return pm


_default: Optional[tuple[tuple[tuple[str, str], ...], PluginManager]] = None
_builtin: Optional[PluginManager] = None


def _installed_key() -> tuple[tuple[str, str], ...]:
    return tuple(
        (ep.name, str(getattr(ep, "value", ""))) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    )


def default_plugin_manager() -> PluginManager:
    """The shared manager of the built-in and installed plugins, built once (again when the installed set changes).

    A run without plugins passed in code uses it. It refuses ``register``: plugins passed to
    :func:`get_plugin_manager` (or ``strategy_plugins=``) get a manager of their own, so no
    plugin leaks from one run into the next.

    Raises:
        PluginError: an installed plugin cannot be loaded.
    """
    global _default
    key = _installed_key()
    if _default is None or _default[0] != key:
        pm = get_plugin_manager()
        pm.share()
        _default = (key, pm)
    return _default[1]


def builtin_plugin_manager() -> PluginManager:
    """The shared manager of the built-in plugins alone (it refuses ``register``, as the default one does).

    What a run with no option set and no plugin of its own uses: installed plugins act through the
    options (``strategy_options``), so such a run needs none of them, and a broken one cannot break it.
    """
    global _builtin
    if _builtin is None:
        _builtin = get_plugin_manager(load_entry_points=False)
        _builtin.share()
    return _builtin


def plugin_manager_for(plugins: Iterable[object] = (), options_set: bool = True) -> PluginManager:
    """The manager of a run: one of its own given ``plugins`` in code, else the shared default one
    (the built-in plugins alone when no option is set, see :func:`builtin_plugin_manager`)."""
    plugins = tuple(plugins)
    if plugins:
        return get_plugin_manager(plugins)
    return default_plugin_manager() if options_set else builtin_plugin_manager()


def describe_plugins(pm: PluginManager) -> list[dict[str, Any]]:
    """One entry per registered plugin (its name, where it comes from, its hooks), then the broken ones."""
    rows: list[dict[str, Any]] = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "source": pm.sources.get(name, IN_CODE), "hooks": hooks})
    for name, why in pm.broken.items():
        rows.append({"name": name, "source": f"BROKEN, not loaded: {why}", "hooks": []})
    return rows


# -- plugins that are not built in: names checked, failures and answers named ------------------


def _display_name(plugin: object, name: Optional[str]) -> str:
    """How messages name a plugin: its entry-point or module name, else its class name."""
    if name is not None and not name.isdigit():
        return name
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return getattr(plugin, "__qualname__", None) or type(plugin).__qualname__


def _check_hook_names(plugin: object, display: str) -> None:
    """A ``hfls_`` attribute that names no hook is a typo: refused at registration, with the closest hook."""
    for attr in dir(plugin):
        if not attr.startswith("hfls_") or attr in _HOOK_NAMES or not callable(getattr(plugin, attr, None)):
            continue
        close = difflib.get_close_matches(attr, sorted(_HOOK_NAMES), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; hooks: {', '.join(sorted(_HOOK_NAMES))}."
        raise PluginError(f"plugin {display!r} defines {attr!r}, which is not a hook of hf-llama-strategies{hint}")


class _GuardedPlugin:
    """What is registered for a plugin that is not built in: its hook functions, each wrapped by :func:`_guard`.

    A wrapper implementation (``wrapper=True`` / ``hookwrapper=True``, a generator) is registered as
    it is: the other plugins' results and errors pass through it, so a failure there is not its own.
    """

    def __init__(self, plugin: object, display: str) -> None:
        self.plugin = plugin
        self.__qualname__ = display
        for attr in dir(plugin):
            function = getattr(plugin, attr, None)
            if attr in _HOOK_NAMES and callable(function):
                wrapper = inspect.isgeneratorfunction(function)
                setattr(self, attr, function if wrapper else _guard(function, attr, display))


def _given_plugin(registered: Any) -> Any:
    return registered.plugin if isinstance(registered, _GuardedPlugin) else registered


def _guard(function: Callable[..., Any], hook: str, display: str) -> Callable[..., Any]:
    """``function`` whose failures and wrong answers name the plugin and the hook.

    ``functools.wraps`` keeps the hookimpl marker and the signature pluggy reads the argument
    names from; pluggy then calls the wrapper with those arguments, in that order.
    """
    # pluggy passes the parameters without a default, in order (a bound method's ``self`` aside).
    argnames = [p.name for p in inspect.signature(function).parameters.values() if p.default is p.empty]

    @functools.wraps(function)
    def guarded(*args: Any) -> Any:
        try:
            result = function(*args)
        except StrategyError:
            raise  # a deliberate refusal of the user's input, worded by the plugin
        except Exception as exc:
            raise PluginError(f"plugin {display!r} failed in {hook}: {type(exc).__name__}: {exc}") from exc
        _check_answer(hook, f"plugin {display!r} (hook {hook})", result, dict(zip(argnames, args)))
        return result

    return guarded


def _check_answer(hook: str, where: str, result: Any, kwargs: dict[str, Any]) -> None:
    """Refuse an answer of the wrong type or about things that do not exist, or a plan it left unusable."""
    if hook in ("hfls_plan_parameters", "hfls_adjust_plan") and kwargs.get("plan") is not None:
        problem = kwargs["plan"].bad_number()
        if problem:
            raise PluginError(f"{where} left a value no run survives in the plan: {problem}.")
    if result is None:
        return
    if hook == "hfls_model_anatomy":
        _check_anatomy(where, result, kwargs["model"])
    elif hook == "hfls_active_parameters":
        _check_active_parameters(where, result, kwargs["plan"])


def _check_anatomy(where: str, result: Any, model: Any) -> None:
    if not isinstance(result, ModelAnatomy):
        raise PluginError(f"{where} returned a {type(result).__name__}, expected a ModelAnatomy or None.")
    modules = dict(model.named_modules())
    paths = [result.layers_path, *result.embedding_paths, *result.norm_paths, *result.head_paths]
    missing = [p for p in paths if p not in modules]
    if missing:
        raise PluginError(f"{where}: module path {missing[0]!r} does not exist in {type(model).__name__}.")
    layers = modules[result.layers_path]
    count = len(layers) if hasattr(layers, "__len__") else None
    if count is None or result.num_layers != count or result.num_layers < 1:
        raise PluginError(
            f"{where}: num_layers={result.num_layers!r}, but {result.layers_path!r} holds {count} layers."
        )


def _check_active_parameters(where: str, result: Any, plan: Any) -> None:
    if isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
        raise PluginError(f"{where} returned a {type(result).__name__}, expected parameter names (a set or list).")
    names = list(result)
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise PluginError(f"{where} returned {wrong[0]!r}, not a parameter name.")
    unknown = [n for n in names if n not in plan.decisions]
    if unknown:
        raise PluginError(f"{where} returned the unknown parameter name {unknown[0]!r}.")
