"""Library chatter (torchao's optional kernels, transformers' config notes) is not optprof's output."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "bitsandbytes")


def quiet_libraries() -> None:
    """Silence library warnings and info logs in this process (spawned trial processes call it too)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
