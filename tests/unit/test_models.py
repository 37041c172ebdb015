from __future__ import annotations

import json
from pathlib import Path

import pytest

from optprof.errors import UsageError
from optprof.model.loading import bundled_models, find_bundled, load_model

# Parameter counts published for these models (tied weights once).
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "tinyllama-1.1b": 1_100_048_384,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "phi-3-mini": 3_821_079_552,
    # Models people train and fine-tune now (#18): totals as their model cards and safetensors index give them.
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
    "mixtral-8x7b": 46_702_792_704,
    "gpt-oss-20b": 20_914_757_184,
    "deepseek-v3": 671_026_404_352,  # the main model; the multi-token-prediction module (14B) is not loaded
    "gemma-2-9b": 9_241_705_984,
    "phi-3.5-mini": 3_821_079_552,
    "mamba-2.8b": 2_768_345_600,
}


def test_every_issue_model_is_bundled() -> None:
    assert set(PUBLISHED_PARAMS) | {"demo"} <= set(bundled_models())


@pytest.mark.parametrize(("name", "params"), sorted(PUBLISHED_PARAMS.items()))
def test_bundled_models_build_on_meta_with_published_sizes(name: str, params: int) -> None:
    info = load_model(name).info
    assert info.params == params
    assert info.source == "bundled"


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("meta-llama/Llama-2-7b", "llama-2-7b"),
        ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
        ("META-LLAMA/LLAMA-2-7B-HF", "llama-2-7b"),
        ("openai-community/gpt2-xl", "gpt2-xl"),
        ("gpt2-xl", "gpt2-xl"),
        ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "tinyllama-1.1b"),
    ],
)
def test_hub_aliases_resolve_offline(alias: str, name: str) -> None:
    bundled = find_bundled(alias)
    assert bundled is not None and bundled.name == name


def test_llama_2_7b_embedding_share_matches_the_paper() -> None:
    info = load_model("meta-llama/Llama-2-7b").info
    assert info.embedding_params == 2 * 32000 * 4096
    assert round(100 * info.embedding_fraction, 2) == 3.89
    assert not info.tied_embeddings
    assert (info.hidden_size, info.num_layers, info.num_heads, info.head_dim) == (4096, 32, 32, 128)


def test_tied_embeddings_counted_once(model_dir) -> None:  # type: ignore[no-untyped-def]
    info = load_model(model_dir("tiny-gpt2")).info
    assert info.tied_embeddings
    assert info.embedding_params == 128 * 32  # wte only; lm_head is the same tensor
    assert info.source == "local"


def test_head_dim_need_not_divide_hidden(model_dir) -> None:  # type: ignore[no-untyped-def]
    info = load_model(model_dir("tiny-gemma")).info
    assert (info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim) == (48, 4, 1, 16)
    assert info.tied_embeddings


def test_dtype_is_applied() -> None:
    import torch

    loaded = load_model("demo", dtype="bfloat16")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    assert loaded.info.dtype == "bfloat16"


def test_unknown_model_suggests_nearest_bundled_name() -> None:
    with pytest.raises(UsageError, match=r"Did you mean: .*llama-2-7b"):
        load_model("llama-2-7")


def test_uncached_hub_id_fails_offline() -> None:
    """One clear line, not a traceback (bench_compare.py times it: no network retries)."""
    with pytest.raises(UsageError, match="not a bundled config, not a local folder"):
        load_model("someone/not-a-model-anywhere")


def test_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"has no config\.json"):
        load_model(str(tmp_path))


def test_unreadable_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(UsageError, match="cannot read the config"):
        load_model(str(tmp_path))


def test_config_without_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(UsageError, match="cannot build a causal LM"):
        load_model(str(tmp_path))


def test_config_with_inconsistent_sizes(tmp_path: Path) -> None:
    """transformers' strict config validation (heads x head_dim must equal expand x hidden): a usage error."""
    config = {"model_type": "mamba2", "hidden_size": 32, "expand": 2, "num_heads": 4, "head_dim": 8,
              "num_hidden_layers": 2, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="must equal"):
        load_model(str(tmp_path))


def test_bad_dtype() -> None:
    with pytest.raises(UsageError, match="unknown dtype 'float64'"):
        load_model("demo", dtype="float64")


def test_hub_id_found_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id whose config.json sits in the Hugging Face cache loads offline, config only."""
    import huggingface_hub.constants
    from support.hub_cache import write_cached_config

    write_cached_config(tmp_path, "someorg/tiny-cached", {"model_type": "llama", "hidden_size": 32,
                                                          "intermediate_size": 64, "num_hidden_layers": 1,
                                                          "num_attention_heads": 4, "vocab_size": 64})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    info = load_model("someorg/tiny-cached").info
    assert info.source == "hub" and info.hidden_size == 32 and info.num_layers == 1


@pytest.mark.parametrize("family", ["roformer", "bert"])
def test_an_encoder_built_as_a_causal_lm_without_is_decoder_is_warned_of(family: str, tmp_path: Path) -> None:
    """BERT-style encoders with a causal-LM head attend to future tokens unless `is_decoder` is set (issue 37:
    roformer's loss fell from 6.35 to 1.27): every report's model line says so; with it set, or for a decoder,
    nothing is said."""
    from tests.support.architectures import write_tiny

    folder = Path(write_tiny(family, tmp_path))
    warned = load_model(str(folder)).info.warning
    assert warned is not None and "is_decoder" in warned
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    assert load_model(str(folder)).info.warning is None
    assert load_model("llama-2-7b").info.warning is None
