"""``python -m hf_llama_strategies`` is the ``hf-llama-strategies`` command."""

import sys

from .cli import main

sys.exit(main())
