"""An installable third-party strategy: ``strategy_options: {freeze_bias: true}`` freezes every bias.

Installed, it is discovered through the ``hf_llama_strategies`` entry-point group; nothing in
hf-llama-strategies names it.
"""

from __future__ import annotations

from hf_llama_strategies import InvalidArgumentError, hookimpl

OPTION = "freeze_bias"


def _enabled(strategy_args) -> bool:
    return bool((strategy_args.strategy_options or {}).get(OPTION, False))


@hookimpl
def hfls_validate_arguments(strategy_args) -> None:
    value = (strategy_args.strategy_options or {}).get(OPTION, False)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"strategy_options.{OPTION}", value, "true or false")


@hookimpl
def hfls_plan_parameters(plan, anatomy, strategy_args, training_args) -> None:
    if _enabled(strategy_args):
        biases = plan.select(lambda d: d.name.endswith(".bias"))
        plan.set(biases, "freeze_bias plugin (hfls-plugin-example)", trainable=False)
