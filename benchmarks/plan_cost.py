"""What `hf-llama-strategies plan` costs on the shipped Llama 3 configs: wall time and peak memory.

Each config is planned in a fresh process (so imports and peak RSS are counted), as a user runs it:

    python benchmarks/plan_cost.py

Targets (issue 6): the 70B plan under 5 s and under 1 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from hf_llama_strategies import cli
plan = cli.run_plan(cli.load_config_file(sys.argv[1]))
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"seconds": elapsed, "peak_bytes": peak, "parameters": plan.num_parameters}))
"""


def main() -> None:
    configs = os.path.join(os.path.dirname(__file__), "..", "hf_llama_strategies", "assets", "configs")
    rows = []
    for name in ("llama3-8b", "llama3-70b"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, os.path.join(configs, f"{name}.yaml")],
            capture_output=True, text=True, check=True,
        ).stdout
        result = json.loads(out.split("RESULT ", 1)[1])
        rows.append((name, result))
    print(f"{'config':<12} {'parameters':>14} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, r in rows:
        print(f"{name:<12} {r['parameters']:>14,} {r['seconds']:>8.2f} {r['peak_bytes'] / 2**20:>13.0f}")


if __name__ == "__main__":
    main()
