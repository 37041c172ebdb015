"""optprof's allocator-configuration parser against a CUDA build's own (for the GPU runbook, ../shared/GPU.md).

A CPU build runs only the shared keys' parser; a CUDA build also runs `CUDAAllocatorConfig::parseArgs`, so every
case of tests/unit/test_alloc_conf.py is put to both here: torch's verdict through
`torch.cuda.memory._set_allocator_settings` (the parser PYTORCH_CUDA_ALLOC_CONF goes through), optprof's through
`AllocatorConfig.parse`. The device machine's torch may be older than the 2.13 optprof follows, so a difference is
a finding to read (a key that version lacks), not a failure. Writes one JSON file (argv[1]).
"""

from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, "tests/unit")
from test_alloc_conf import CUDA_CASES, SHARED_CASES, UNKNOWN_KEYS

from optprof.device.alloc_conf import AllocatorConfig, AllocConfError


def torch_says(text: str) -> str | None:
    """None when the CUDA build takes `text`, else the first line of its message."""
    try:
        torch.cuda.memory._set_allocator_settings(text)
    except (RuntimeError, ValueError, IndexError) as exc:
        return str(exc).splitlines()[0]
    return None


def optprof_says(text: str) -> str | None:
    try:
        AllocatorConfig.parse(text)
    except AllocConfError as exc:
        return str(exc)
    return None


def main(path: str) -> None:
    torch.cuda.init()
    rows = []
    for text in [*SHARED_CASES, *UNKNOWN_KEYS, *CUDA_CASES]:
        if text.startswith("backend:"):
            continue  # the backend is fixed when the allocator loads; a runtime change is refused for that alone
        torch_says("large_segment_size_mb:20")  # settings outlive a call: reset what pass 1 reads (may be unknown)
        ours, theirs = optprof_says(text), torch_says(text)
        rows.append({"text": text, "optprof": ours, "torch": theirs,
                     "same_verdict": (ours is None) == (theirs is None)})
    summary = {"torch": torch.__version__, "cases": len(rows),
               "same_verdict": sum(r["same_verdict"] for r in rows), "rows": rows}
    with open(path, "w") as file:
        json.dump(summary, file, indent=1)
    print(f"allocator configuration: {summary['same_verdict']}/{len(rows)} cases with torch {torch.__version__}'s "
          "verdict")
    for row in rows:
        if not row["same_verdict"] or row["optprof"] != row["torch"]:
            print(f"  {row['text']!r}: optprof {row['optprof']!r}; torch {row['torch']!r}")


if __name__ == "__main__":
    main(sys.argv[1])
