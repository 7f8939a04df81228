"""Built-in strategies, one module (or package) each, registered as plugins like any third-party one.

Each holds its options (an ``OptionGroup`` dataclass: meaning and checks), and the hooks that write
its decisions into the plan. ``hf_llama_strategies.arguments`` composes the option groups into
``StrategyArguments``; nothing else outside this package imports one.
"""
