"""Library chatter (torchao's optional kernels, transformers' config notes) is not optprof's output.

Only named libraries are quieted, by category and by the module that warns: a warning from optprof itself, or a
DeprecationWarning from a torch or transformers API that optprof patches, still shows (`--debug` shows all).
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "bitsandbytes")

# (category, regex of the warning module) pairs: notes meant for the libraries' own users.
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"torch\.distributed\..*"),  # FSDP2 / fake process group notes on CPU ranks
    (UserWarning, r"torch\.utils\.checkpoint"),  # use_reentrant notes under --gradient-checkpointing
    (UserWarning, r"transformers\..*"),
    (FutureWarning, r"transformers\..*"),
    (UserWarning, r"(torchao|bitsandbytes|adam_mini|pytorch_optimizer|lomo_optim|apollo_torch|peft)(\..*)?"),
    (FutureWarning, r"(torchao|bitsandbytes|peft)(\..*)?"),
)


def quiet_libraries() -> None:
    """Silence the named libraries' warnings and info logs in this process (spawned trial processes call it too)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
