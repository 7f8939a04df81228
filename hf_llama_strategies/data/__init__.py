"""Data for the CLI: local text/JSON/CSV files, instruction and chat records (``task: sft``), chat
templates named as LLaMA-Factory names them, and the metric modules shipped with the package.
"""
