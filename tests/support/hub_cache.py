"""Writes a config.json into a Hugging Face hub cache laid out as huggingface_hub expects."""

from __future__ import annotations

import json
from pathlib import Path

FAKE_COMMIT = "0" * 40


def write_cached_config(cache: Path, repo_id: str, config: dict) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
