"""The words a report uses, each with one meaning: statuses, verdicts, peak sources, fold rules, how a figure was
obtained. StrEnums, so they read and write as their plain values in JSON and CSV and compare by member in code."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """How one optimizer's row (or trial) went. Only FAILED makes a command exit 1."""

    OK = "ok"
    FAILED = "failed"  # the optimizer ran here and broke: a real problem, exit code 1
    UNAVAILABLE = "unavailable"  # cannot run on this machine (package missing): not an error
    OOM = "oom"  # ran out of device memory at this micro-batch: a finding, not an error
    UNSUPPORTED = "unsupported"  # this setup cannot run this way (the reason says why): a finding
    NO_FIT = "does not fit"  # --micro-batch auto: not even micro-batch 1 fits the memory limit
    INTERRUPTED = "interrupted"  # SIGINT or SIGTERM stopped the run before this row finished: nothing is known of it


class Support(StrEnum):
    """Whether an optimizer runs under a strategy, decided by one fake step (`optprof optimizers --strategy`)."""

    OK = "ok"
    UNSUPPORTED = "unsupported"  # the optimizer's own code refused, with its reason
    FAILED = "failed"
    UNAVAILABLE = "unavailable"
    UNDECIDED = "undecided"  # the fake step could not say (the model reads tensor values): the real run decides


class Judgement(StrEnum):
    """A guarded figure of `optprof check` against its profile (Verdict.verdict)."""

    OK = "ok"
    REGRESSION = "regression"
    IMPROVED = "improved"
    SKIPPED = "skipped"
    MISSING = "missing"  # the optimizer failed or was unavailable: nothing to compare


class PeakSource(StrEnum):
    """Which figure a compare row's peak_bytes is (the best one for the device)."""

    TORCH_RESERVED = "torch_max_reserved"  # CUDA: what the caching allocator held, exact
    TENSOR = "tensor_peak"  # CPU: live tensor bytes at the peak, from torch's MemTracker
    RSS = "rss_peak"  # CPU without the tracked step: sampled, overstates (the C allocator keeps freed memory)


class FoldRule(StrEnum):
    """How one figure of a distributed trial's rank rows folds into the group's row (see rows.RANK_FOLD)."""

    SUM = "sum"  # the group's total; an interval's bounds are summed (ranks in lockstep)
    MAX = "max"  # the worst rank
    MEAN = "mean"
    SLOWEST_RANK = "slowest rank"  # the figures of the rank with the slowest median step (the phases still add up)
    PEAK_RANK = "peak rank"  # the figures of the rank with the largest tensor peak (its breakdown)
    LOGICAL = "logical"  # the unsharded size
    DERIVED = "derived"  # recomputed from the folded figures


class StateMethod(StrEnum):
    """How a state figure was obtained (StateSizeRow.method, before any layer extrapolation)."""

    META_STEP = "meta step"
    META_PLACEHOLDERS = "meta step, placeholder scalars"  # value reads answered by a placeholder
    FSDP_FAKE = "FSDP2 on fake tensors, fake process group"  # --gpus N: real sharding, no memory


class LayerExtent(StrEnum):
    """For a model of more than 3 layers, what its state figures were stepped on (StateSizeRow.layer_extent)."""

    # copies of the model's first 1, 2 and 3 layers, every figure checked affine in the layer count and
    # extrapolated to the whole model (exact where it holds)
    EXTRAPOLATED = "extrapolated from the first 1, 2 and 3 layers"
    NOT_AFFINE = "whole model (its state is not affine in the layer count)"  # the copies could not stand for it


# The categories of a peak's breakdown (CompareRow.breakdown, PredictRow.predicted_breakdown), in table order.
BREAKDOWN_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")

# How a derived figure was obtained (CompareRow.derived): computed from measurements, not read off a counter.
DERIVED_FWD_BWD_CUDA = ("the allocator's allocated peak through the first timed backward, plus its reserved - "
                        "allocated gap over the timed steps (CUDA keeps no reserved peak per phase)")
DERIVED_OUTSIDE = ("NVML's sampled process peak less torch.cuda.max_memory_reserved: the CUDA context, NCCL's "
                   "buffers and the rest outside the caching allocator (the two peaks need not coincide)")
DERIVED_MFU = ("model FLOPs per token (PaLM formula) x tokens/s / the device's dense data-sheet peak "
               "(or --peak-tflops)")



class MaxMethod(StrEnum):
    """How predict found the largest micro-batch."""

    SOLVED = "solved"  # from the traces at micro-batch 2 and 3 (each allocation affine in it), confirmed at N and N+1
    SEARCHED = "searched"  # by the search: no solution from two traces, or the confirmation disagreed
