"""What a CLI run does not print: other packages' words about things the run does not use, and notes said twice."""

from __future__ import annotations

import logging
from typing import Any


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


_UNUSED_DEEPSPEED = _DropMessages("Setting accelerator to CPU")
_OWN_ARGUMENTS = _DropMessages("hf-llama-strategies precision: TrainingArguments changed in place")


def quiet_run(training_args: Any) -> None:
    """Silence what a CLI run would print about what it does not use or what its plan table says already.

    - DeepSpeed, when the run does not use it: accelerate imports it whenever it is installed (its
      ``extract_model_from_parallel`` checks for a DeepSpeed engine) and DeepSpeed then warns, on a
      machine without a GPU, "Setting accelerator to CPU. If you have GPU ...". A filter on its logger
      (which DeepSpeed creates by name, so the filter holds whether or not it is imported yet) drops that line.
    - The precision's "TrainingArguments changed in place": the CLI's arguments are its own, not
      the user's object, and the plan table states the precision decided.
    """
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not getattr(training_args, "deepspeed", None) and _UNUSED_DEEPSPEED not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_UNUSED_DEEPSPEED)
    precision_logger = logging.getLogger("hf_llama_strategies.core.precision")
    if _OWN_ARGUMENTS not in precision_logger.filters:
        precision_logger.addFilter(_OWN_ARGUMENTS)
