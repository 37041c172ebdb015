"""Shared fixtures: tiny model configs written to folders, never fetched from a hub."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Tests never touch the network: a hub id must fail fast, from the cache or not at all.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist each worker is one of the machine's cores: torch (and every trial it spawns) on one thread,
# else two workers' OpenMP pools spin against each other and against the trials.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
# Output goes to a pipe, as in CI: pytest-xdist's workers set an 80-column terminal size, which would make rich
# wrap tables that a pipe gets at full width (render.console.PIPE_WIDTH).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
# Support decisions are cached per user; tests keep theirs apart (and start with none).
os.environ["OPTPROF_CACHE_DIR"] = tempfile.mkdtemp(prefix="optprof-test-cache-")

import gc

import pytest
import torch

from optprof.cli.app import GC_THRESHOLDS

# The collector as the optprof command sets it (in main): every test runs under it, not only those after a test
# that called main.
gc.set_threshold(*GC_THRESHOLDS)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "max_position_embeddings": 64, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}
# GPT-2 ties its output layer to the input embedding and fuses Q, K and V into one Conv1D (c_attn).
TINY_GPT2 = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
    "n_positions": 64, "vocab_size": 128, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
}
# Gemma: tied embeddings and head_dim * heads (4 * 16 = 64) != hidden_size (48).
TINY_GEMMA = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 48, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
    "vocab_size": 128, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
}

CONFIGS = {"tiny-llama": TINY_LLAMA, "tiny-gpt2": TINY_GPT2, "tiny-gemma": TINY_GEMMA}


@pytest.fixture
def model_dir(tmp_path: Path) -> Callable[[str], str]:
    """model_dir("tiny-gemma") -> a folder holding that config.json, usable as MODEL."""

    def make(name: str) -> str:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
        return str(folder)

    return make


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
