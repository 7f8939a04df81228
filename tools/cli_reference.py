"""Write docs/cli-reference.md from the dataclasses' field docs (``--check``: only say whether it is current).

    python tools/cli_reference.py          # rewrite docs/cli-reference.md
    python tools/cli_reference.py --check  # exit 1 when the committed page differs
"""

from __future__ import annotations

import pathlib
import sys

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli-reference.md"


def main(argv: list[str]) -> int:
    """Write the page, or with ``--check`` compare it with the committed one."""
    from hf_llama_strategies.cli.reference import markdown_reference

    text = markdown_reference()
    if "--check" in argv:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is out of date: run python tools/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
