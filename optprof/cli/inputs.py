"""Flag values -> settings: the model selection, sizes and the checks that several commands make alike.

Everything here raises `UsageError` (one line, exit 2) on bad input; nothing imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optprof.config import SHARDED_STRATEGIES, Dtype, ModelSelection, Strategy, TrainingSetup
from optprof.errors import UsageError


@dataclass
class Session:
    """What the top-level flags set for the whole run."""

    debug: bool = False  # --debug: tracebacks and library warnings instead of one-line errors


SESSION = Session()


def model_selection(model: str, dtype: Dtype, revision: str | None, trust_remote_code: bool,
                    lora: str | None = None, freeze: list[str] | None = None, qlora: str | None = None,
                    attention: str | None = None) -> ModelSelection:
    """The model and what trains, from the model flags."""
    from optprof.model.setups import parse_lora

    if lora is not None and qlora is not None:
        raise UsageError("--lora and --qlora: give one (--qlora is LoRA on a 4-bit base)")
    spec = lora if qlora is None else qlora
    setup = TrainingSetup(parse_lora(spec) if spec is not None else None, tuple(freeze or ()), qlora is not None,
                          attention)
    return ModelSelection(model, dtype, revision, trust_remote_code, setup)


def whole_number(text: str, flag: str) -> int:
    """A count of at least 1 given as text (flags that also take words, such as --micro-batch auto)."""
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{flag}: expected a whole number of at least 1; got '{text}'")
    return int(text)


def sharded(strategy: Strategy, command: str) -> Strategy:
    """state-size and predict shard with FSDP2 on fake ranks: ddp and zero1 are compare's to measure."""
    if strategy not in SHARDED_STRATEGIES:
        names = ", ".join(SHARDED_STRATEGIES)
        raise UsageError(f"--strategy {strategy}: {command} shards with FSDP2 ({names}); "
                         f"run `optprof compare --strategy {strategy}` to measure it")
    return strategy


def one_device(gpus: int, save_profile: Path | None) -> None:
    if save_profile is not None and gpus > 1:
        raise UsageError("--save-profile: profiles describe one device for now; drop --gpus")
