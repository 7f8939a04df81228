"""The shape of the code: what imports what, one plugin manager and one run context per run, call order."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest
from helpers import ProbeIs, TokenDataset, make_training_args
from tiny_models import tiny_model

from hf_llama_strategies import (
    HardwareProbe,
    InvalidArgumentError,
    RunContext,
    StrategyArguments,
    StrategyCallback,
    StrategyTrainer,
    build_plan,
    cli,
    estimate_training_memory,
    hookimpl,
)
from hf_llama_strategies.core import plugins

PACKAGE = pathlib.Path(plugins.__file__).parent.parent


def _import_graph():
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", PACKAGE.parent / "tools" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    return graph


def test_the_package_keeps_its_rules():
    # No import circle (type-only and deferred imports count), every part imports only the parts below
    # it (tools/import_graph.py: MAY_IMPORT), no function over 80 lines.
    assert _import_graph().check() == []


def test_only_arguments_imports_the_strategies_and_only_their_option_groups():
    graph = _import_graph()
    importers = {m for m, targets in graph.graph().items() for t in targets
                 if t.startswith("strategies") and not m.startswith("strategies")}
    assert importers == {"arguments"}
    tree = ast.parse((PACKAGE / "arguments.py").read_text(encoding="utf-8"))
    names = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and "strategies" in (node.module or "")
        for alias in node.names
    }
    assert names == {"FreezingArguments", "LayerwiseLrArguments", "GradualUnfreezingArguments", "LisaArguments",
                     "FrozenPrefixCacheArguments", "check_schedules"}
    # The built-in plugin list names them, as strings: the one place the core knows a strategy.
    assert all(name.startswith("hf_llama_strategies.") for name in plugins.BUILTIN_PLUGINS)


def test_the_plan_data_model_imports_only_what_it_is_made_of_at_import_time():
    tree = ast.parse((PACKAGE / "core" / "plan.py").read_text(encoding="utf-8"))
    top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level}
    assert top_level == {"anatomy", "decisions", "dtypes", "errors", "plan_table", "units"}


class CountingPlugin:
    """Records the context and the plugin manager every hook of a run receives."""

    def __init__(self):
        self.contexts: list[RunContext] = []

    @hookimpl
    def hfls_plan_parameters(self, plan, context):
        self.contexts.append(context)

    @hookimpl
    def hfls_validate_plan(self, plan, context):
        self.contexts.append(context)

    @hookimpl
    def hfls_on_train_begin(self, model, context):
        self.contexts.append(context)


def test_one_plugin_manager_and_one_context_per_strategy_trainer_run(tmp_path, monkeypatch):
    # Built before the run: the arguments load no plugin.
    strategy = StrategyArguments(trainable_layers="-1:", head_lr=1e-3, print_plan=False)
    built = []
    real = plugins.get_plugin_manager
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    recorder = CountingPlugin()
    trainer = StrategyTrainer(
        model=tiny_model("llama"), args=make_training_args(tmp_path, max_steps=2), train_dataset=TokenDataset(n=8),
        strategy_args=strategy, strategy_plugins=[recorder],
    )
    trainer.train()
    assert len(built) == 1, "a run with a plugin in code builds exactly one manager of its own"
    context = trainer.strategy_callback.context
    assert len(recorder.contexts) == 3 and all(c is context for c in recorder.contexts)
    assert context.plugin_manager is built[0] and trainer.strategy_callback.plugin_manager is built[0]


def test_one_plugin_manager_per_cli_train(tmp_path, monkeypatch):
    built = []
    real = plugins.get_plugin_manager
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    monkeypatch.setattr(plugins, "_default", None)  # a fresh process: nothing cached yet
    out = tmp_path / "run"
    overrides = ["--output_dir", str(out), "--max_steps", "1", "--trainable_layers=-1:", "--save_strategy", "no",
                 "--eval_strategy", "no", "--max_train_samples", "8", "--report_to", "none", "--disable_tqdm", "true"]
    assert cli.main(["train", *overrides]) == 0
    assert (out / "strategy_plan.json").is_file()
    assert len(built) == 1, "parse_config, the plan and the trainer share the default manager"


def test_build_plan_asks_the_hardware_of_a_probe_plugin(tmp_path):
    a100 = HardwareProbe("cuda", "NVIDIA A100", bf16_supported=True, tf32_supported=True, compute_capability=(8, 0))
    plan = build_plan(tiny_model("llama"), StrategyArguments(precision="auto"), plugins=[ProbeIs(a100)])
    assert plan.settings["precision"]["device"] == a100.describe()
    assert plan.settings["precision"]["mode"] == "bf16"
    # For another machine without a plugin: the probe itself.
    plan = build_plan(tiny_model("llama"), StrategyArguments(precision="auto"), probe=a100)
    assert (plan.settings["precision"]["device"], plan.settings["precision"]["mode"]) == (a100.describe(), "bf16")


def test_distributed_fixes_reach_an_accelerator_without_ddp_settings_of_its_own():
    import types

    from hf_llama_strategies.core.distributed import DistributedFixes

    accelerator = types.SimpleNamespace(ddp_handler=None, state=types.SimpleNamespace(fsdp_plugin=None))
    DistributedFixes(ddp_find_unused_parameters=True).apply_to(accelerator)
    assert accelerator.ddp_handler.find_unused_parameters is True


def test_the_default_plugin_manager_refuses_a_plugin_so_none_leaks_into_later_runs():
    from hf_llama_strategies.errors import PluginError

    with pytest.raises(PluginError, match="strategy_plugins"):
        plugins.default_plugin_manager().register(Order())
    assert not plugins.default_plugin_manager().is_registered(Order)


class Order:
    """A plugin passed in code that notes what the built-in strategies had decided when it ran."""

    seen: dict[str, object] = {}

    @hookimpl
    def hfls_plan_parameters(self, plan):
        # freezing is tryfirst: done; layerwise_lr (registered earlier, same marks): not yet.
        Order.seen["frozen"] = plan["model.layers.0.mlp.up_proj.weight"].trainable
        Order.seen["head_lr"] = plan["lm_head.weight"].lr


def test_plugins_passed_in_code_run_before_the_built_in_ones_of_the_same_marks():
    plan = build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="-1:", head_lr=1e-3), plugins=[Order()])
    assert Order.seen == {"frozen": False, "head_lr": None}
    assert plan["lm_head.weight"].lr == 1e-3
    assert "run first" in plugins.get_plugin_manager.__doc__


def test_a_run_changes_nothing_of_the_users_but_what_a_precision_option_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp --fsdp_version 1
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.delenv("FSDP_USE_ORIG_PARAMS", raising=False)
    environ = dict(os.environ)
    args = make_training_args(tmp_path, max_steps=2)
    before = args.to_dict()
    strategy = StrategyArguments(lisa_layers=1, lisa_interval_steps=1, print_plan=False)
    trainer = StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=TokenDataset(n=8),
                              strategy_args=strategy)
    trainer.train()
    assert args.to_dict() == before and dict(os.environ) == environ
    assert not [name for name in vars(args) if name.startswith("_hfls")]
    # What the plan needs is the run's own: its accelerator's DDP settings.
    assert trainer.accelerator.ddp_handler.find_unused_parameters is True


def test_strategy_arguments_are_validated_by_installed_plugins_once_and_by_code_plugins_at_the_run():
    calls = []

    class Refuser:
        @hookimpl
        def hfls_validate_arguments(self, strategy_args):
            calls.append(strategy_args)
            if (strategy_args.strategy_options or {}).get("refuse"):
                from hf_llama_strategies import InvalidArgumentError

                raise InvalidArgumentError("strategy_options", strategy_args.strategy_options, "no 'refuse' key")

    strategy = StrategyArguments(strategy_options={"refuse": True})  # the default manager knows no Refuser
    with pytest.raises(Exception, match="no 'refuse' key"):
        build_plan(tiny_model("llama"), strategy, plugins=[Refuser()])
    build_plan(tiny_model("llama"), StrategyArguments(head_lr=1e-3), plugins=[Refuser()])
    assert len(calls) == 2


def test_the_import_table_of_the_architecture_doc_is_the_code_s():
    table = _import_graph().table()
    assert (
        "| core | `core.plan` | core.anatomy, core.decisions, core.dtypes, core.options, core.plan_table, core.units, "
        "errors |" in table
    )  # the data model, as the test above says
    assert table in (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8"), (
        "docs/architecture.md is out of date: paste the output of `python tools/import_graph.py`"
    )


def test_a_model_replaced_after_trainer_init_is_checked_with_the_fixes_the_accelerator_got(tmp_path):
    from dataclasses import replace

    from hf_llama_strategies import InvalidArgumentError
    from hf_llama_strategies.core.distributed import DistributedFixes

    trainer = StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path),
                              strategy_args=StrategyArguments(lisa_layers=1, print_plan=False))
    context = trainer.strategy_callback.context
    # As under torchrun with activation checkpointing, where the Trainer's default would be False.
    context.distributed = replace(context.distributed, world_size=2, activation_checkpointing=True)
    assert trainer._hfls_fixes.ddp_find_unused_parameters is True
    trainer._prepare_trainer_model_for(tiny_model("llama"), trainer.args, can_set=False)  # the fix counts
    trainer._hfls_fixes = DistributedFixes()  # control: without the fix the same check refuses
    with pytest.raises(InvalidArgumentError, match="ddp_find_unused_parameters"):
        trainer._prepare_trainer_model_for(tiny_model("llama"), trainer.args, can_set=False)


BROKEN_PLUGIN = "def hfls_plan_parameters(plan):\n    pass\nraise RuntimeError('half-installed')\n"


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed plugin whose module raises when it is imported (issue 20's first bug)."""
    import sys

    dist_info = tmp_path / "broken_hfls-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-hfls\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[hf_llama_strategies]\nbroken = broken_hfls_mod\n")
    (tmp_path / "broken_hfls_mod.py").write_text(BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_default", None)
    yield "broken"
    sys.modules.pop("broken_hfls_mod", None)


def test_a_broken_installed_plugin_breaks_no_run_without_options_and_is_named_by_one_with(tmp_path, broken_plugin):
    from hf_llama_strategies.errors import PluginError

    StrategyArguments()  # loads no plugin
    trainer = StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path, max_steps=1),
                              train_dataset=TokenDataset(n=4), strategy_args=StrategyArguments())
    trainer.train()  # the Trainer itself: no plan, no plugin
    # Without an option, the callback, the plan and the memory estimate use the built-in plugins alone.
    from transformers import Trainer

    Trainer(model=tiny_model("llama"), args=make_training_args(tmp_path / "c", max_steps=1),
            train_dataset=TokenDataset(n=4), callbacks=[StrategyCallback(StrategyArguments())]).train()
    build_plan(tiny_model("llama"))
    estimate_training_memory(tiny_model("llama"))
    with pytest.raises(PluginError, match="installed plugin 'broken' cannot be loaded .*half-installed"):
        StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path / "b", max_steps=1),
                        train_dataset=TokenDataset(n=4), strategy_args=StrategyArguments(trainable_layers="-1:"))


def test_precision_half_with_fp16_is_one_precision_for_the_library_and_the_cli(tmp_path):
    # Issue 20: the CLI had its own alias table and refused what the library accepts.
    t4 = HardwareProbe("cuda", "Tesla T4", bf16_supported=False, compute_capability=(7, 5))
    args = make_training_args(tmp_path, use_cpu=False)
    args.fp16 = True  # as parsed on a GPU machine: TrainingArguments' own check of the device is not the question
    context = RunContext.create(StrategyArguments(precision="half"), args, probe=t4)
    assert context.precision.mode == "fp16"
    from hf_llama_strategies.cli.config import _check_precision_flags

    _check_precision_flags({"precision": "half", "fp16": True}, [])  # no refusal
    with pytest.raises(InvalidArgumentError, match="bf16=True is not valid"):
        _check_precision_flags({"precision": "half", "bf16": True}, [])
