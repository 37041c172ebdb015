"""--gpu local: op times measured on this machine (CPU here), and gloo collectives timed on spawned ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from optprof.device.local_times import collective_key, measured_collectives, measured_times, op_spec
from optprof.device.ops import OpKind, OpRecord


def test_a_measured_matmul_grows_with_its_size_and_is_cached(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("OPTPROF_CACHE_DIR", str(tmp_path))
    records = []
    for size in (64, 512):
        key, spec = op_spec(torch.ops.aten.mm.default, (torch.empty(size, size), torch.empty(size, size)), {})
        records.append(OpRecord("aten.mm.default", OpKind.MATMUL, "default", "forward", 2 * size**3, 0, "fp32", (),
                                (), key=key, spec=spec))
    times = measured_times(records, "cpu")
    small, large = (times[r.key or ""] for r in records)
    assert small is not None and large is not None and large > small > 0
    assert list(tmp_path.glob("op-times-*.json"))  # cached: a second call times nothing
    assert measured_times(records, "cpu") == times


def test_gloo_collectives_are_timed_on_two_spawned_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTPROF_CACHE_DIR", str(tmp_path))
    gather = OpRecord("all-gather", OpKind.COLLECTIVE, "all-gather", "forward", 0, 8 << 20, "fp32", (), (),
                      group=(0, 1))
    found = measured_collectives([gather], threads=1)
    seconds = found[collective_key(gather)]
    assert seconds is not None and 0 < seconds < 5
