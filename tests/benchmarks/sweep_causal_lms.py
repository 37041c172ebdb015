"""Every causal LM type transformers ships (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), as a tiny config built from its own
config class (nothing downloaded), through state-size and predict, and every fifth type through compare. Each type
runs in a process of its own under a time limit, so a hang is a row, not the end of the sweep.

    python tests/benchmarks/sweep_causal_lms.py [--jobs 2] [--only llama,xlnet] [--out sweep.json]
    make sweep

Prints a table of counts per command (clean, unsupported with a reason, refused in one line, failed, hung) and one
line per type that is not clean. "eager" is transformers' own CPU training step (forward with labels, backward)
without optprof: a type whose eager step fails cannot run in any command, and that is not optprof's to fix.
The tiny sizes are the issue's: hidden 64, 2 layers, 4 heads / 2 kv heads, head dim 16, vocab 512, 4 experts with
top-2; special token ids inside the vocabulary; tests/support/architectures.py's FIXES where a family needs more.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for support.architectures

TINY: dict[str, Any] = dict(
    hidden_size=64, n_embd=64, d_model=64, embed_dim=64, embedding_dim=64, dim=64, intermediate_size=128,
    ffn_hidden_size=128, ffn_dim=128, d_ff=128, d_inner=128, n_inner=128, num_hidden_layers=2, n_layer=2,
    num_layers=2, n_layers=2, num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_key_value_heads=2,
    n_kv_heads=2, num_kv_heads=2, head_dim=16, d_head=16, kv_channels=16, vocab_size=512, max_position_embeddings=256,
    n_positions=256, rotary_dim=16,
    moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_top_k=2, top_k=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    state_size=8, expand=2, conv_kernel=4, time_step_rank=4, mamba_n_heads=4, mamba_d_head=32,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    sliding_window=64, tie_word_embeddings=False, hidden_size_global=64,  # blt's local models see its global one
    # encoder-decoder families' decoders (plbart, whisper; blenderbot's cache counts encoder_layers), the top-k's other
    # names (ernie4_5_moe, kimi_linear: 6 or 8 of 4 experts), one dense layer of two where a family counts them, and
    # no layers sharing another's keys and values (gemma3n: the last 15 of 35; two layers have none to spare)
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, moe_k=2, num_experts_per_token=2, num_dense_layers=1, num_kv_shared_layers=0,
    adapter_in_dim=64, adapter_input_size=64, adapter_out_dim=64,  # a tower's adapter: its hidden to the text's
    vocab_size_per_layer_input=512, hidden_size_per_layer_input=16,  # gemma3n / gemma4: 262144 x 256 per layer
)
SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "unk_token_id",
           "mask_token_id", "decoder_start_token_id", "image_token_id", "image_token_index", "video_token_id")
# Fields that must agree with the small ones: per-layer lists cut to the layer count, one layer of each kind kept
# where it can be (LAYER_LISTS, `_cut`), multi-head latent attention's derived dims, and a few
# families' own switches (the sweep's FIXES, beside tests/support/architectures.py's)
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "attn_type_list",
               "mlp_layer_types", "full_attention_layers", "sliding_window_pattern_list")
QSA = dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4)
SWEEP_FIXES: dict[str, dict[str, Any]] = {
    # ReformerModelWithLMHead refuses a config that is not a decoder; training needs the axial position shape to
    # multiply to the sequence (32 tokens) and its dims to sum to hidden, and chunks that divide the sequence
    "reformer": dict(is_decoder=True, axial_pos_shape=(4, 8), axial_pos_embds_dim=(16, 48),
                     local_attn_chunk_length=16, lsh_attn_chunk_length=16),
    "blt": dict(use_cache=False),  # its cache is built from the top config, which has no num_hidden_layers
    # the default configs below cannot build a model at all; the Hub's checkpoints set these
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # DbrxAttention reads both
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # None by default, indexed per layer
    "qwen4_exp_text": QSA, "qwen4_exp": {f"text_config.{key}": value for key, value in QSA.items()},  # indexed layers
    "xmod": dict(default_language="en_XX"),  # its adapters need a language; en_XX is the default's only one
    "kolibri1_1": dict(index_num_heads=2),  # at most the query heads of a key head (4 of 2: 2)
    "zaya": dict(num_experts_per_tok=1),  # its validator: "supports num_experts_per_tok=1 only"
    "xlstm": dict(qk_dim_factor=1.0),  # its cache rounds hidden x qk_dim_factor up to a multiple of 64, its layers not
}
COMPARE_EVERY = 5  # compare runs every fifth type (its real steps are the sweep's cost)
OPTIMIZERS = "adamw,adam-mini"
LIMIT_S = 300  # per type, all its commands


def tiny_config(model_type: str) -> Any:
    """The type's default config with every size key it has set small, in every sub-config, and special token
    ids moved inside the vocabulary."""
    from support.architectures import FIXES
    from transformers import AutoConfig, PretrainedConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type)

        def shrink(part: Any) -> None:
            before = _layers(part)
            for key, value in TINY.items():
                if key in vars(part) and not isinstance(getattr(type(part), key, None), property):
                    setattr(part, key, value)
            vocab = getattr(part, "vocab_size", TINY["vocab_size"]) or TINY["vocab_size"]
            for index, key in enumerate(SPECIAL):
                value = vars(part).get(key)
                if isinstance(value, int) and value >= vocab:
                    setattr(part, key, index % 3)
                elif isinstance(value, list):
                    setattr(part, key, [v if not isinstance(v, int) or v < vocab else index % 3 for v in value])
            layers = _layers(part)
            for key, value in list(vars(part).items()):  # any other list with one entry per layer (swiglu limits)
                if key not in LAYER_LISTS and isinstance(value, list | tuple) and before != layers and \
                        len(value) == before:
                    setattr(part, key, type(value)(_cut(list(value), layers)))
            for key in LAYER_LISTS:
                value = vars(part).get(key)
                if layers is not None and isinstance(value, list | tuple) and len(value) > layers:
                    setattr(part, key, type(value)(_cut(list(value), layers)))
                elif layers is not None and isinstance(value, str) and len(value) > layers:
                    setattr(part, key, "".join(_cut(list(value), layers)))
            if isinstance(vars(part).get("qk_rope_head_dim"), int):  # multi-head latent attention's derived dims
                if "head_dim" in vars(part):
                    part.head_dim = part.qk_rope_head_dim  # the rotary part's
                if "qk_head_dim" in vars(part):
                    part.qk_head_dim = part.qk_nope_head_dim + part.qk_rope_head_dim
                if "num_key_value_heads" in vars(part):
                    part.num_key_value_heads = vars(part)["num_attention_heads"]  # every head's keys (deepseek_v3);
                    # read from the fields: a per-layer attribute of a heterogeneous config raises on access
            for value in list(vars(part).values()):
                if isinstance(value, PretrainedConfig):
                    shrink(value)

        shrink(config)
        for key, value in {**FIXES.get(model_type, {}), **SWEEP_FIXES.get(model_type, {})}.items():
            *path, name = key.split(".")  # "attn_config.rope_theta": in a sub-config
            setattr(functools.reduce(getattr, path, config), name, value)
        return _rebuilt(config)


def _layers(part: Any) -> int | None:
    return next((vars(part)[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                 if isinstance(vars(part).get(k), int)), None)


def _rebuilt(part: Any) -> Any:
    """The config built again from its fields, sub-configs first, so that what its `__post_init__` derived from the
    default sizes is derived from the tiny ones: fields that default to None and still hold the default config's
    derived value are left out (zamba's attention_hidden_size, xlstm's num_blocks, hrm_text's layers per stack,
    gemma4's per-layer overrides), and so are attributes that are no fields (zamba2's mamba_headdim), which a
    reload would otherwise set back over the derived ones; attributes the default has not (a fix's) are kept."""
    import dataclasses

    from transformers import PretrainedConfig

    for key, value in list(vars(part).items()):
        if isinstance(value, PretrainedConfig):
            setattr(part, key, _rebuilt(value))
    try:
        default = vars(type(part)())
    except Exception:  # a sub-config class that needs arguments: kept as it is
        return part
    fields = {f.name: f.default for f in dataclasses.fields(part) if f.init}

    def derived(key: str, value: Any) -> bool:  # a field that defaults to None, holding what the default derived
        return fields[key] is None and key in default and not isinstance(value, PretrainedConfig) and \
            _same(value, default[key])

    given = {key: value for key, value in vars(part).items() if key in fields and not derived(key, value)}
    added = {key: value for key, value in vars(part).items() if key not in fields and key not in default}
    return type(part)(**given, **added)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _cut(values: list[Any], layers: int) -> list[Any]:
    """A per-layer list cut to `layers` that keeps one layer of each kind where it can: the first `layers` of a
    hybrid are often all linear attention (qwen3_next: three before each full one), and transformers' step fails
    on a model with no attention layer at all (`get_mask_sizes` on a cache of linear layers alone)."""
    kinds = list(dict.fromkeys(map(str, values)))
    if len(kinds) > layers:
        return values[:layers]
    firsts = sorted({str(value): index for index, value in reversed(list(enumerate(values)))}.values())
    rest = [index for index in range(len(values)) if index not in firsts]
    return [values[index] for index in sorted(firsts + rest[:layers - len(firsts)])]


def _status(report: dict[str, Any]) -> tuple[str, str]:
    rows = report.get("results") or []
    statuses = [row.get("status") for row in rows]
    for kind in ("failed", "unsupported", "unavailable", "interrupted"):
        if kind in statuses:
            row = rows[statuses.index(kind)]
            return ("failed" if kind in ("failed", "interrupted") else "unsupported"), \
                f"{row.get('optimizer')}: {row.get('reason')}"
    return "clean", ""


def _eager_step(folder: Path) -> list[str]:
    """transformers' own eager training step on CPU (forward with labels, backward), without optprof: where it
    fails, no command of optprof's can run the model either, and the row says so."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        tokens = torch.randint(3, 64, (2, 32))
        model(input_ids=tokens, labels=tokens).loss.backward()
    except Exception as exc:
        return ["failed", f"transformers' own CPU step: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    return ["clean", ""]


def run_one(model_type: str, folder: Path, with_compare: bool) -> dict[str, Any]:
    """In this process (the child): the tiny config, then each command through optprof's entry point."""
    from optprof.cli.app import main

    found: dict[str, Any] = {}
    progress = folder / "progress.json"
    try:
        tiny_config(model_type).save_pretrained(folder)
    except Exception as exc:  # the config class itself refuses the tiny sizes: not optprof's to run
        return {"config": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    found["eager"] = _eager_step(folder)
    commands = {"state-size": ["state-size", str(folder), "-o", OPTIMIZERS],
                "predict": ["predict", str(folder), "-o", OPTIMIZERS, "--device", "cpu", "--seq-len", "32"]}
    if with_compare:
        commands["compare"] = ["compare", str(folder), "-o", "adamw", "--device", "cpu", "--seq-len", "32",
                               "--steps", "2", "--no-preflight"]
    for name, argv in commands.items():
        output = folder / f"{name}.json"
        progress.write_text(json.dumps({**found, name: ["hung", "did not end within the time limit"]}))
        stderr = folder / f"{name}.err"
        with stderr.open("w") as err:
            saved = sys.stderr
            sys.stderr = err
            try:
                main([*argv, "--output", str(output)])
                code = 0
            except SystemExit as done:
                code = int(done.code or 0)
            finally:
                sys.stderr = saved
        lines = [line for line in stderr.read_text().splitlines() if line.startswith("optprof:")]
        if code == 2:
            found[name] = ["refused", lines[-1][:300] if lines else "exit 2"]
        elif code in (0, 1) and output.exists():
            found[name] = list(_status(json.loads(output.read_text())))
        else:
            found[name] = ["failed", (lines[-1] if lines else f"exit {code}")[:300]]
    progress.write_text(json.dumps(found))
    return found


def sweep_type(model_type: str, index: int, root: Path, limit_s: float = LIMIT_S) -> dict[str, Any]:
    folder = root / model_type.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    command = [sys.executable, str(HERE), "--one", model_type, "--folder", str(folder)]
    if index % COMPARE_EVERY == 0:
        command.append("--compare")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"sweep": f"the type's process died: {done.stderr[-300:]}"}
    except subprocess.TimeoutExpired:
        progress = folder / "progress.json"
        result = json.loads(progress.read_text()) if progress.exists() else {"config": "hung building the config"}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default="sweep.json")
    parser.add_argument("--limit", type=float, default=LIMIT_S, help="seconds per type, all its commands")
    parser.add_argument("--one", default="")  # internal: one type, in its own process
    parser.add_argument("--folder", default="")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.folder), args.compare)))
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    chosen = [t for t in types if not args.only or t in args.only.split(",")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(args.jobs) as pool:
        futures = {t: pool.submit(sweep_type, t, types.index(t), Path(root), args.limit) for t in chosen}
        results = {t: future.result() for t, future in futures.items()}
    wall = time.monotonic() - started
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"{len(chosen)} causal LM types of transformers {__import__('transformers').__version__}, "
          f"{wall / 60:.1f} min with {args.jobs} jobs")
    built = [t for t in chosen if "config" not in results[t] and "sweep" not in results[t]]
    print(f"tiny configs built: {len(built)} / {len(chosen)}")
    print("| command | clean | unsupported | refused (one line) | failed | hung |\n|---|---:|---:|---:|---:|---:|")
    for command in ("eager", "state-size", "predict", "compare"):
        ran = [results[t][command][0] for t in built if command in results[t]]
        counts = {kind: ran.count(kind) for kind in ("clean", "unsupported", "refused", "failed", "hung")}
        print(f"| {command} ({len(ran)}) | " + " | ".join(str(counts[k]) for k in counts) + " |")
    print("\nnot clean:")
    for t in chosen:
        result = results[t]
        if "config" in result or "sweep" in result:
            print(f"- {t}: config: {result.get('config') or result.get('sweep')}")
            continue
        for command in ("eager", "state-size", "predict", "compare"):
            if command in result and result[command][0] != "clean":
                print(f"- {t}: {command} {result[command][0]}: {result[command][1]}")


if __name__ == "__main__":
    main()
