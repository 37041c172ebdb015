"""An exception raised while an optimizer ran, as its row's status and reason: one rule for every command.

- unsupported: a finding about the optimizer, with the library's own words (the setup asked for is one it cannot
  run in, its code needs CUDA where there is none, or it cannot run on the parameters as the strategy spreads them);
- oom: the step ran out of memory (a finding about memory);
- failed: anything else, an error someone must fix.
"""

from __future__ import annotations

import importlib.util

from optprof.config import Strategy
from optprof.errors import SetupUnsupported, error_text
from optprof.optimizers.registry import OptimizerEntry
from optprof.results.vocab import Status


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _package_folder(entry: OptimizerEntry) -> str | None:
    """Where the optimizer's own code lives: torch.optim for torch's, the package's folder for others;
    None for optprof's own optimizers (their failures are optprof's to fix)."""
    if entry.package == "optprof":
        return None
    spec = importlib.util.find_spec("torch.optim" if entry.module == "torch" else entry.module.partition(".")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


def raised_by_optimizer(exc: BaseException, entry: OptimizerEntry) -> bool:
    """Whether the error came through the optimizer's own code (not the model's, not optprof's)."""
    folder = _package_folder(entry)
    trace = exc.__traceback__
    while folder is not None and trace is not None:
        if trace.tb_frame.f_code.co_filename.startswith(folder):
            return True
        trace = trace.tb_next
    return False


# What a library raises where its code needs CUDA and there is none (torch's own words).
NEEDS_CUDA = ("Torch not compiled with CUDA enabled", "not linked with support for cuda", "Found no NVIDIA driver",
              "No CUDA GPUs are available")


def unsupported_reason(exc: BaseException, entry: OptimizerEntry, ranks: int,
                       strategy: Strategy = Strategy.FSDP) -> str | None:
    """The `unsupported` reason (a finding about the optimizer, not a failure to fix here), else None:
    - the setup asked for is one the optimizer cannot run in (SetupUnsupported, e.g. LOMO with --grad-accum);
    - the optimizer's own code needs CUDA where there is none (AdaLomo creates its state with `.cuda()`);
    - the optimizer's own code failed on the parameters as `strategy` spreads them over `ranks` (DTensor
      shards; zero1: a share of whole parameters)."""
    if isinstance(exc, SetupUnsupported):
        return str(exc)
    if not raised_by_optimizer(exc, entry):
        return None
    if any(text in str(exc) for text in NEEDS_CUDA):
        return f"{entry.package}'s own code needs CUDA: {error_text(exc)}"
    if ranks <= 1 or strategy == Strategy.DDP:
        return None
    where = ("as ZeroRedundancyOptimizer's local optimizer over a share of the parameters" if strategy == Strategy.ZERO1
             else "on FSDP2-sharded (DTensor) parameters")
    return f"{entry.package}'s own code cannot run {where} over {ranks} ranks ({strategy}): {error_text(exc)}"


def status_of(exc: BaseException, entry: OptimizerEntry, ranks: int = 1,
              strategy: Strategy = Strategy.DDP) -> tuple[Status, str]:
    """The status and reason of a row whose optimizer raised `exc` over `ranks` ranks under `strategy`."""
    unsupported = unsupported_reason(exc, entry, ranks, strategy)
    if unsupported is not None:
        return Status.UNSUPPORTED, unsupported
    return (Status.OOM if is_out_of_memory(exc) else Status.FAILED), error_text(exc)
