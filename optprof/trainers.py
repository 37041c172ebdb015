"""Named trainers' training steps (--recipe): the precision, checkpointing, loss and FSDP2 layout each trainer's
own code sets, with the file and function every setting follows.

Read from the trainers' public repositories at the commits named in `Recipe.source`; where the code differed from
our first reading, the code won (noted in `Recipe.note`). Pure data: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optprof.config import (
    SHARDED_STRATEGIES,
    Amp,
    Checkpointing,
    Dtype,
    FsdpUnits,
    Precision,
    Strategy,
    UpdateImpl,
    parse_checkpointing,
    parse_loss,
    parse_mp_policy,
)
from optprof.errors import UsageError


@dataclass(frozen=True)
class Setting:
    """One setting of a recipe and where the trainer's code makes it."""

    what: str  # as optprof's flags say it, e.g. "--mp-policy bf16,fp32"
    where: str  # file: function (what it does there)


@dataclass(frozen=True)
class Recipe:
    name: str
    trainer: str  # the trainer and the code read
    source: str  # repository @ commit (date)
    amp: Amp | None = None
    mp_param: Precision | None = None
    mp_reduce: Precision | None = None
    sharded_only_policy: bool = True  # the policy applies under FSDP only (on one device without FSDP: none)
    fsdp_units: FsdpUnits = FsdpUnits.BLOCKS
    checkpointing: Checkpointing = Checkpointing.NONE
    loss_chunks: int | None = None
    dtype: Dtype | None = None  # the parameters' stored dtype; None: float32, or as loaded (dtype_as_loaded)
    dtype_as_loaded: bool = False  # parameters in the dtype from_pretrained gives them (the config's `dtype`)
    strategy: Strategy = Strategy.FSDP  # with several ranks
    update_impl: UpdateImpl | None = None  # torch optimizers' implementation; None: torch's choice (CUDA: foreach)
    settings: tuple[Setting, ...] = ()
    note: str = ""


TORCHTITAN = Recipe(
    name="torchtitan",
    trainer="torchtitan",
    source="pytorch/torchtitan @ b5bcd76 (2026-08-21)",
    mp_param=Precision.BF16, mp_reduce=Precision.FP32, sharded_only_policy=False,
    fsdp_units=FsdpUnits.ENDS_GATHERED, checkpointing=Checkpointing.SELECTIVE_OP, update_impl=UpdateImpl.FUSED,
    settings=(
        Setting("--strategy fsdp, float32 parameters", "torchtitan/distributed/fsdp.py: apply_fsdp_to_decoder "
                "(fully_shard per block, then the root)"),
        Setting("--mp-policy bf16,fp32", "torchtitan/config/configs.py: mixed_precision_param = 'bfloat16', "
                "mixed_precision_reduce = 'float32'; fsdp.py: apply_fsdp_to_decoder (MixedPrecisionPolicy(param_dtype, "
                "reduce_dtype, cast_forward_inputs=False)); no autocast anywhere in trainer.py"),
        Setting("FSDP units ends-gathered", "torchtitan/distributed/fsdp.py: apply_fsdp_to_decoder (tok_embeddings "
                "its own unit; [norm, lm_head] one unit with reshard_after_forward False by default)"),
        Setting("--activation-checkpointing selective-op", "torchtitan/trainer.py: Trainer.Config "
                "(activation_checkpoint defaults to SelectiveAC.Config); distributed/activation_checkpoint.py: "
                "SelectiveAC._wrap_block (save compute-intensive ops, recompute every second mm, force-recompute "
                "the MoE router gate's mm shape)"),
        Setting("--loss default (fp32 logits)", "torchtitan/components/loss.py: cross_entropy_loss "
                "(F.cross_entropy(pred.float(), ...))"),
        Setting("fused AdamW", "torchtitan/components/optimizer/optimizer.py: OptimizersContainer.Config "
                "(implementation = 'fused') and _build_impl_kwargs (fused=True, foreach=False)"),
    ),
    note="our first reading had the last block kept gathered after forward; the code now keeps [norm, lm_head] "
         "gathered instead, and every block is resharded",
)

ACCELERATE_FSDP2 = Recipe(
    name="accelerate-fsdp2",
    trainer="accelerate (FSDP2 plugin, mixed_precision='bf16')",
    source="huggingface/accelerate @ 16cb6eb (2026-07-24)",
    mp_param=Precision.BF16, mp_reduce=Precision.BF16, sharded_only_policy=False,
    fsdp_units=FsdpUnits.ENDS_GATHERED,
    settings=(
        Setting("--mp-policy bf16,bf16", "src/accelerate/utils/dataclasses.py: FullyShardedDataParallelPlugin."
                "set_mixed_precision (param_dtype = reduce_dtype = output_dtype = bf16); utils/fsdp_utils.py: "
                "fsdp2_prepare_model (parameters upcast to float32 when mixed_precision != 'no')"),
        Setting("no autocast", "src/accelerate/accelerator.py: Accelerator._prepare_fsdp2 (never calls "
                "prepare_model, which is where native_amp wraps forward in autocast)"),
        Setting("FSDP units ends-gathered", "src/accelerate/utils/fsdp_utils.py: fsdp2_prepare_model (blocks by the "
                "auto-wrap policy, input embeddings their own unit, [final norm, lm_head] with "
                "reshard_after_forward False, then the root)"),
        Setting("--activation-checkpointing none", "src/accelerate/accelerator.py: _prepare_fsdp2 (fsdp2_apply_ac "
                "only when the plugin's activation_checkpointing is set)"),
        Setting("foreach AdamW (torch's default on CUDA)", "examples/torch_native_parallelism/fsdp2_fp8.py: "
                "torch.optim.AdamW(model.parameters(), lr=1e-5), neither fused nor foreach given"),
    ),
)

HF_TRAINER = Recipe(
    name="hf-trainer",
    trainer="transformers Trainer (bf16=True, no FSDP)",
    source="transformers 5.25.0 (installed) with accelerate @ 16cb6eb",
    amp=Amp.BF16, dtype_as_loaded=True, strategy=Strategy.DDP, update_impl=UpdateImpl.FUSED,
    settings=(
        Setting("parameters as loaded", "transformers/modeling_utils.py: PreTrainedModel.from_pretrained (dtype "
                "None becomes 'auto') and _get_dtype ('auto': the config's dtype, else the checkpoint's)"),
        Setting("--amp bf16", "src/accelerate/accelerator.py: Accelerator.prepare_model (native_amp wraps forward "
                "in autocast for mixed_precision='bf16'); transformers/trainer.py leaves autocast to accelerate"),
        Setting("--activation-checkpointing none", "transformers/training_args.py: TrainingArguments."
                "gradient_checkpointing (off unless asked)"),
        Setting("--strategy ddp", "the Trainer without an FSDP or DeepSpeed config wraps the model in DDP"),
        Setting("fused AdamW", "transformers/training_args.py: TrainingArguments.__post_init__ (default_optim "
                "'adamw_torch_fused' for torch >= 2.8); trainer_optimizer.py: _get_adamw_torch (fused=True)"),
    ),
)

LIGHTNING_BF16_MIXED = Recipe(
    name="lightning-bf16-mixed",
    trainer="Lightning (precision='bf16-mixed')",
    source="Lightning-AI/pytorch-lightning @ 7f0c343 (2026-07-20)",
    amp=Amp.BF16, mp_param=Precision.BF16, mp_reduce=Precision.BF16,
    settings=(
        Setting("float32 parameters, --amp bf16", "src/lightning/fabric/plugins/precision/fsdp.py: FSDPPrecision "
                "(bf16-mixed keeps float32 parameters; forward_context: torch.autocast('cuda', bfloat16))"),
        Setting("--mp-policy bf16,bf16 when sharded", "src/lightning/fabric/plugins/precision/fsdp.py: "
                "FSDPPrecision.mixed_precision_config (bf16-mixed: param_dtype = reduce_dtype = bfloat16)"),
        Setting("--activation-checkpointing none", "src/lightning/pytorch/strategies/fsdp.py: FSDPStrategy "
                "(activation_checkpointing_policy None by default)"),
        Setting("foreach AdamW (torch's default on CUDA)", "the optimizer is the user's configure_optimizers; "
                "Lightning's examples pass neither fused nor foreach (examples/pytorch/basics/autoencoder.py) or "
                "foreach=True (examples/pytorch/tensor_parallel/train.py)"),
    ),
    note="the policy comes from Lightning's FSDP (FSDP1) strategy, whose MixedPrecision optprof applies through "
         "FSDP2; with several ranks autocast and the policy both run, as Lightning's code has them",
)

TORCHTUNE = Recipe(
    name="torchtune",
    trainer="torchtune (full_finetune_distributed)",
    source="pytorch/torchtune @ bd2a0fc (2026-04-23)",
    dtype=Dtype.BFLOAT16, fsdp_units=FsdpUnits.ENDS_SHARDED, checkpointing=Checkpointing.FULL, loss_chunks=8,
    update_impl=UpdateImpl.FUSED,
    settings=(
        Setting("--dtype bfloat16 (parameters, gradients, state)", "recipes/configs/llama3_1/8B_full.yaml: dtype: "
                "bf16; recipes/full_finetune_distributed.py builds the model in that dtype"),
        Setting("--activation-checkpointing full", "recipes/configs/llama3_1/8B_full.yaml: "
                "enable_activation_checkpointing: True (every TransformerSelfAttentionLayer)"),
        Setting("--loss chunked:8", "torchtune/modules/loss/cross_entropy_loss.py: LinearCrossEntropyLoss "
                "(num_output_chunks=8: the head projected and upcast per chunk of tokens)"),
        Setting("FSDP units ends-sharded", "recipes/configs/llama3_1/8B_full.yaml: custom_sharded_layers: "
                "['tok_embeddings', 'output']; torchtune/training/_distributed.py: shard_model "
                "(reshard_after_forward True, the root False)"),
        Setting("fused AdamW", "recipes/configs/llama3_1/8B_full.yaml: optimizer: torch.optim.AdamW, fused: True "
                "(70B_full.yaml sets fused: False, which torch runs as the for-loop)"),
    ),
    note="torchtune's config now names LinearCrossEntropyLoss (masks ignored tokens, then projects in chunks), "
         "the successor of CEWithChunkedOutputLoss",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (TORCHTITAN, ACCELERATE_FSDP2, HF_TRAINER, LIGHTNING_BF16_MIXED,
                                                   TORCHTUNE)}


@dataclass(frozen=True)
class StepChoice:
    """The training step asked for: flags over the recipe's settings (--recipe), resolved."""

    dtype: Dtype
    strategy: Strategy  # with several ranks
    fields: dict[str, Any]  # TrainingSettings' step fields (amp, mp_param, ..., recipe)
    replicated: bool = False  # the recipe replicates the model (DDP): predict shows one rank's figures


def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise UsageError(f"--recipe: unknown recipe '{name}': choose {', '.join(RECIPES)} (see `optprof recipes`)")
    return RECIPES[name]


def recipe_dtype(recipe: str | None, dtype: Dtype | None, model_dtype: Callable[[], Dtype]) -> Dtype:
    """The parameters' stored dtype: --dtype, else the recipe's (hf-trainer's: as the model loads, read through
    `model_dtype` only then), else float32."""
    chosen = recipe_named(recipe) if recipe is not None else None
    if dtype is None and chosen is not None:
        dtype = chosen.dtype or (model_dtype() if chosen.dtype_as_loaded else None)
    return dtype or Dtype.FLOAT32


def step_choice(recipe: str | None, dtype: Dtype | None, strategy: Strategy | None, amp: Amp | None,
                mp_policy: str | None, activation_checkpointing: str | None, gradient_checkpointing: bool,
                loss: str | None, ranks: int, model_dtype: Callable[[], Dtype]) -> StepChoice:
    """The step's settings: each explicit flag, else the recipe's value, else the default. `model_dtype` reads the
    dtype the model loads in (hf-trainer's parameters), only when needed."""
    chosen = recipe_named(recipe) if recipe is not None else None
    if gradient_checkpointing and activation_checkpointing not in (None, "full"):
        raise UsageError(f"--gradient-checkpointing is --activation-checkpointing full, not "
                         f"{activation_checkpointing}: give one")
    if gradient_checkpointing:
        activation_checkpointing = "full"
    strategy = strategy or (chosen.strategy if chosen is not None else Strategy.FSDP)
    sharded = strategy in SHARDED_STRATEGIES
    mp_param = mp_reduce = None
    if mp_policy is not None:
        mp_param, mp_reduce = parse_mp_policy(mp_policy)
    elif chosen is not None and chosen.mp_param is not None and (ranks > 1 or not chosen.sharded_only_policy):
        mp_param, mp_reduce = chosen.mp_param, chosen.mp_reduce
    if mp_param is not None and not sharded:
        raise UsageError(f"--mp-policy is FSDP2's MixedPrecisionPolicy, which --strategy {strategy} does not run: "
                         f"use --amp {mp_param if mp_param != Precision.FP32 else 'bf16'} (autocast) there, or "
                         f"--strategy {', '.join(SHARDED_STRATEGIES)}")
    mode, every = (parse_checkpointing(activation_checkpointing) if activation_checkpointing is not None
                   else ((chosen.checkpointing, 1) if chosen is not None else (Checkpointing.NONE, 1)))
    chunks = parse_loss(loss) if loss is not None else (chosen.loss_chunks if chosen is not None else None)
    fields = {
        "amp": amp if amp is not None else (chosen.amp if chosen is not None else None),
        "mp_param": mp_param, "mp_reduce": mp_reduce,
        "fsdp_units": chosen.fsdp_units if chosen is not None else FsdpUnits.BLOCKS,
        "checkpointing": mode, "checkpoint_every": every, "loss_chunks": chunks,
        "recipe": chosen.name if chosen is not None else None,
        "update_impl": chosen.update_impl if chosen is not None else None,
    }
    replicated = chosen is not None and strategy not in SHARDED_STRATEGIES and ranks > 1
    return StepChoice(recipe_dtype(recipe, dtype, model_dtype), strategy, fields, replicated)
