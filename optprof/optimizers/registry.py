"""Registry: optimizer name -> OptimizerEntry (how to build it for a model, where it comes from).

A new optimizer is one entry here. Builders take the module, its ModelInfo and the user's --opt-arg
values, and return a torch.optim.Optimizer over every trainable parameter of that module.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optprof.errors import UsageError
from optprof.model.info import ModelInfo, trainable_parameters
from optprof.optimizers import recipes
from optprof.optimizers.adam_mini_official import adam_mini_for_model
from optprof.optimizers.adam_mini_paper import AdamMiniPaper, paper_partition
from optprof.optimizers.state import with_gradient_graph
from optprof.results.reports import OptimizersReport
from optprof.results.rows import OptimizerListing

Builder = Callable[[nn.Module, ModelInfo, Mapping[str, Any]], torch.optim.Optimizer]

# Families, coarse: how the optimizer spends memory per parameter.
SGD_FAMILY = "sgd"  # no per-parameter statistics beyond momentum
ADAPTIVE = "adaptive"  # a per-element second moment, as Adam
BLOCKWISE = "blockwise-adaptive"  # second moment per block (Adam-mini)
FACTORED = "factored"  # second moment as row and column factors (Adafactor, CAME, SM3)
SIGN = "sign"  # momentum only, sign update (Lion)
LOW_RANK = "low-rank"  # state in a projected subspace (GaLore, APOLLO)
ORTHOGONALIZED = "orthogonalized"  # momentum orthogonalized by Newton-Schulz on the hidden matrices (Muon)
PRECONDITIONED = "preconditioned"  # Kronecker-factored preconditioners per matrix (Shampoo, SOAP)
QUANTIZED = "quantized"  # 8-bit or 4-bit state
FUSED = "fused-backward"  # updates inside backward, keeps no gradients (LOMO)
CUSTOM = "custom"

ADAM_SECOND_MOMENT = frozenset({"exp_avg_sq", "max_exp_avg_sq"})

# From the optimizer study (seeds/000): A ⊆ B means B reduces to A for some hyperparameter setting.
INCLUSION_CHAINS: tuple[tuple[str, ...], ...] = (
    ("sgd", "momentum", "rmsprop"),
    ("sgd", "momentum", "adam"),
    ("sgd", "nesterov", "nadam"),
)


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    package: str  # distribution whose version the report shows
    module: str  # importable module the builder needs; availability is checked against it
    family: str
    description: str
    build: Builder
    second_moment_keys: frozenset[str] = frozenset()  # state keys holding the adaptive denominators
    settings: Callable[[Mapping[str, Any]], str] | None = None  # the memory-relevant settings in effect

    def row_head(self, opt_args: Mapping[str, Any]) -> dict[str, Any]:
        """The fields every report's row starts with: who the optimizer is and the settings in effect."""
        return {"optimizer": self.name, "package": self.package, "package_version": package_version(self.package),
                "family": self.family, "settings": self.settings(opt_args) if self.settings else None}


@dataclass(frozen=True)
class Forwarding:
    """A builder that hands the user's --opt-arg keys to one callable (`module.name`), so that a key none of the
    selected optimizers takes is caught before anything is built."""

    build: Builder
    module: str
    name: str

    def __call__(self, model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        return self.build(model, info, args)

    def receiver(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.name)


def _package_optimizer(module: str, cls_name: str, **fixed: Any) -> Builder:
    def build(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        cls = getattr(importlib.import_module(module), cls_name)
        return cls(trainable_parameters(model), **{**fixed, **args})

    return Forwarding(build, module, cls_name)


def _torch_optimizer(cls_name: str, **fixed: Any) -> Builder:
    return _package_optimizer("torch.optim", cls_name, **fixed)


def distributed_world_size() -> int:
    """Ranks in the current process group, 1 when there is none (whatever GPUs are visible)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _adam_mini(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    return adam_mini_for_model(model, hidden_size=info.hidden_size, num_heads=info.num_heads,
                               num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                               world_size=distributed_world_size(), **args)


def _adam_mini_paper(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    partition = paper_partition(model, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                                head_dim=info.head_dim)
    return AdamMiniPaper(partition, **args)


def _hf_adafactor(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # An explicit lr needs relative_step off; transformers' defaults otherwise (no first moment).
    defaults = {"lr": 1e-3, "relative_step": False, "scale_parameter": False, "warmup_init": False}
    return Adafactor(trainable_parameters(model), **{**defaults, **args})


def _sophia_h(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    from pytorch_optimizer import SophiaH

    return with_gradient_graph(SophiaH(trainable_parameters(model), **args))


def _lomo(cls_name: str) -> Builder:
    """lomo-optim's optimizers take the model itself: they hook every trainable parameter's gradient."""

    def build(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        import lomo_optim

        return getattr(lomo_optim, cls_name)(model, **{"lr": 1e-3, **args})

    return build


def _torch_entries() -> list[OptimizerEntry]:
    return [
        OptimizerEntry("sgd", "torch", "torch", SGD_FAMILY, "SGD, no momentum: no state",
                       _torch_optimizer("SGD", lr=1e-3)),
        OptimizerEntry("momentum", "torch", "torch", SGD_FAMILY, "SGD with heavy-ball momentum 0.9",
                       _torch_optimizer("SGD", lr=1e-3, momentum=0.9)),
        OptimizerEntry("nesterov", "torch", "torch", SGD_FAMILY, "SGD with Nesterov momentum 0.9",
                       _torch_optimizer("SGD", lr=1e-3, momentum=0.9, nesterov=True)),
        OptimizerEntry("rmsprop", "torch", "torch", ADAPTIVE, "RMSProp: per-element second moment",
                       _torch_optimizer("RMSprop", lr=1e-3), frozenset({"square_avg"})),
        OptimizerEntry("adam", "torch", "torch", ADAPTIVE, "Adam: first and second moment per element",
                       _torch_optimizer("Adam", lr=1e-3), ADAM_SECOND_MOMENT),
        OptimizerEntry("adamw", "torch", "torch", ADAPTIVE, "AdamW (decoupled weight decay); the reference",
                       _torch_optimizer("AdamW", lr=1e-3), ADAM_SECOND_MOMENT),
        OptimizerEntry("nadam", "torch", "torch", ADAPTIVE, "NAdam: Adam with Nesterov momentum",
                       _torch_optimizer("NAdam", lr=1e-3), ADAM_SECOND_MOMENT),
        OptimizerEntry("adagrad", "torch", "torch", ADAPTIVE, "Adagrad: accumulated squared gradients",
                       _torch_optimizer("Adagrad", lr=1e-3), frozenset({"sum"})),
        OptimizerEntry("adafactor", "torch", "torch", FACTORED, "torch's Adafactor: row/column second moment",
                       _torch_optimizer("Adafactor", lr=1e-3), frozenset({"row_var", "col_var", "variance"})),
        OptimizerEntry("adafactor-hf", "transformers", "transformers", FACTORED,
                       "transformers' Adafactor (factored second moment, no momentum)",
                       Forwarding(_hf_adafactor, "transformers.optimization", "Adafactor"),
                       frozenset({"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"})),
    ]


def _adam_mini_entries() -> list[OptimizerEntry]:
    return [
        OptimizerEntry("adam-mini", "adam-mini", "adam_mini", BLOCKWISE,
                       "official Adam-mini: one v per head (Q, K), per neuron elsewhere, per row of embeddings",
                       Forwarding(_adam_mini, "adam_mini", "Adam_mini"), frozenset({"vmean", "v"})),
        OptimizerEntry("adam-mini-paper", "optprof", "optprof", BLOCKWISE,
                       "Adam-mini per the paper (Alg. 1-4): full v for embedding and output, one per block else",
                       Forwarding(_adam_mini_paper, "optprof.optimizers.adam_mini_paper", "AdamMiniPaper"),
                       frozenset({"v"})),
    ]


def _package_entries() -> list[OptimizerEntry]:
    po = "pytorch-optimizer"
    return [
        OptimizerEntry("came", po, "pytorch_optimizer", FACTORED, "CAME: confidence-guided factored Adam",
                       _package_optimizer("pytorch_optimizer", "CAME", lr=2e-4),
                       frozenset({"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"})),
        OptimizerEntry("sm3", po, "pytorch_optimizer", FACTORED, "SM3: cover-set accumulators",
                       _package_optimizer("pytorch_optimizer", "SM3", lr=1e-1),
                       frozenset({"accumulator_0", "accumulator_1", "accumulator_2", "accumulator_3"})),
        OptimizerEntry("lamb", po, "pytorch_optimizer", ADAPTIVE, "LAMB: layer-wise trust ratio on Adam",
                       _package_optimizer("pytorch_optimizer", "Lamb", lr=1e-3), ADAM_SECOND_MOMENT),
        OptimizerEntry("lion", po, "pytorch_optimizer", SIGN, "Lion: sign of interpolated momentum",
                       _package_optimizer("pytorch_optimizer", "Lion", lr=1e-4)),
        OptimizerEntry("adan", po, "pytorch_optimizer", ADAPTIVE, "Adan: Nesterov-style adaptive momentum",
                       _package_optimizer("pytorch_optimizer", "Adan", lr=1e-3), ADAM_SECOND_MOMENT),
        OptimizerEntry("galore", po, "pytorch_optimizer", LOW_RANK,
                       f"GaLore: Adam in a rank-{recipes.GALORE_DEFAULT_RANK} gradient projection (--opt-arg rank=N)",
                       recipes.galore, ADAM_SECOND_MOMENT, recipes.galore_settings),
        OptimizerEntry("novograd", po, "pytorch_optimizer", ADAPTIVE, "NovoGrad: layer-wise second moment",
                       _package_optimizer("pytorch_optimizer", "NovoGrad", lr=1e-3), frozenset({"grads_ema"})),
        OptimizerEntry("schedulefree-adamw", po, "pytorch_optimizer", ADAPTIVE,
                       "Schedule-Free AdamW: keeps the z sequence instead of momentum",
                       _package_optimizer("pytorch_optimizer", "ScheduleFreeAdamW", lr=1e-3),
                       frozenset({"exp_avg_sq"})),
        OptimizerEntry("adamw8bit-bnb", "bitsandbytes", "bitsandbytes", QUANTIZED,
                       "bitsandbytes AdamW8bit: blockwise 8-bit moments",
                       _package_optimizer("bitsandbytes.optim", "AdamW8bit"), frozenset({"state2"})),
        OptimizerEntry("adamw8bit-torchao", "torchao", "torchao", QUANTIZED,
                       "torchao AdamW8bit: 8-bit moments as a tensor subclass",
                       _package_optimizer("torchao.optim", "AdamW8bit"), ADAM_SECOND_MOMENT),
        OptimizerEntry("adamw4bit-torchao", "torchao", "torchao", QUANTIZED,
                       "torchao AdamW4bit: 4-bit moments (block size 128) as a tensor subclass",
                       _package_optimizer("torchao.optim", "AdamW4bit"), ADAM_SECOND_MOMENT),
    ]


def _current_entries() -> list[OptimizerEntry]:
    """The optimizers people choose between in 2026: Muon and its variants, second-order preconditioners,
    learning-rate-free and multi-momentum Adam, and APOLLO's projected scaling."""
    po, pkg = "pytorch-optimizer", "pytorch_optimizer"
    return [
        OptimizerEntry("muon", "torch", "torch", ORTHOGONALIZED,
                       "Muon (torch.optim.Muon) on the hidden 2-D matrices, AdamW on the rest", recipes.muon,
                       ADAM_SECOND_MOMENT, recipes.muon_settings),
        OptimizerEntry("normuon", po, pkg, ORTHOGONALIZED,
                       "NorMuon: Muon with a per-neuron second moment; AdamW on non-matrix parameters",
                       recipes.muon_family("NorMuon"), frozenset({"second_momentum_buffer", "exp_avg_sq"}),
                       recipes.muon_settings),
        OptimizerEntry("adamuon", po, pkg, ORTHOGONALIZED,
                       "AdaMuon: Muon with an element-wise second moment; AdamW on non-matrix parameters",
                       recipes.muon_family("AdaMuon"), frozenset({"v", "exp_avg_sq"}), recipes.muon_settings),
        OptimizerEntry("soap", po, pkg, PRECONDITIONED, "SOAP: Adam in Shampoo's eigenbasis (per-matrix factors)",
                       _package_optimizer(pkg, "SOAP"), frozenset({"exp_avg_sq"})),
        OptimizerEntry("shampoo", po, pkg, PRECONDITIONED, "Shampoo: Kronecker-factored preconditioner per matrix",
                       _package_optimizer(pkg, "Shampoo", lr=1e-3)),
        OptimizerEntry("prodigy", po, pkg, ADAPTIVE, "Prodigy: Adam with the step size estimated (lr 1)",
                       _package_optimizer(pkg, "Prodigy"), frozenset({"exp_avg_sq"})),
        OptimizerEntry("ademamix", po, pkg, ADAPTIVE, "AdEMAMix: Adam with a second, slow first moment",
                       _package_optimizer(pkg, "AdEMAMix"), frozenset({"exp_avg_sq"})),
        OptimizerEntry("mars", po, pkg, ADAPTIVE, "MARS (AdamW type): variance-reduced Adam, keeps the last gradient",
                       _package_optimizer(pkg, "MARS"), frozenset({"exp_avg_sq"})),
        OptimizerEntry("sophiah", po, pkg, ADAPTIVE,
                       "SophiaH: Hutchinson estimate of the Hessian diagonal in the step (backward keeps the "
                       "gradients' graph)", _sophia_h, frozenset({"hessian_moment"})),
        OptimizerEntry("lomo", "lomo-optim", "lomo_optim", FUSED,
                       "LOMO: SGD fused into backward, no gradients kept (its own fused_backward)",
                       _lomo("Lomo")),
        OptimizerEntry("adalomo", "lomo-optim", "lomo_optim", FUSED,
                       "AdaLomo: LOMO with a factored second moment (its state is made with .cuda())",
                       _lomo("AdaLomo")),  # its moments are attributes keyed by name, not optimizer.state
        OptimizerEntry("apollo", "apollo-torch", "apollo_torch", LOW_RANK,
                       "APOLLO (authors' apollo-torch): channel-wise scaling from a rank-256 random projection",
                       recipes.apollo(recipes.APOLLO_DEFAULTS), frozenset({"exp_avg_sq"}),
                       recipes.apollo_settings(recipes.APOLLO_DEFAULTS)),
        OptimizerEntry("apollo-mini", "apollo-torch", "apollo_torch", LOW_RANK,
                       "APOLLO-Mini (apollo-torch): one scale per tensor from a rank-1 random projection",
                       recipes.apollo(recipes.APOLLO_MINI_DEFAULTS), frozenset({"exp_avg_sq"}),
                       recipes.apollo_settings(recipes.APOLLO_MINI_DEFAULTS)),
    ]


REGISTRY: dict[str, OptimizerEntry] = {e.name: e for e in [*_torch_entries(), *_adam_mini_entries(),
                                                           *_package_entries(), *_current_entries()]}

DEFAULT_OPTIMIZERS = ("adamw", "adam-mini", "adam-mini-paper", "adafactor", "sgd", "momentum")


def package_version(package: str) -> str | None:
    if package == "optprof":
        from optprof import __version__

        return __version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def availability(entry: OptimizerEntry) -> str | None:
    """None when the entry can be built here, else the reason it cannot (shown to the user)."""
    if importlib.util.find_spec(entry.module) is None:
        extra = " (in optprof's checkout: pip install -e '.[quantized]')" if entry.family == QUANTIZED else ""
        return f"package {entry.package} is not installed{extra}"
    return None


def optimizers_report() -> OptimizersReport:
    """What `optprof optimizers` lists: every registered optimizer, and whether it can run here."""
    rows = []
    for entry in REGISTRY.values():
        reason = availability(entry)
        rows.append(OptimizerListing(entry.name, entry.package, package_version(entry.package), entry.family,
                                     reason is None, reason, entry.description))
    return OptimizersReport(optimizers=tuple(rows), inclusion_chains=INCLUSION_CHAINS)


def is_import_path(name: str) -> bool:
    return ":" in name


def custom_entry(path: str) -> OptimizerEntry:
    """`package.module:ClassName`: any torch.optim.Optimizer subclass taking params first."""
    module_name, _, cls_name = path.partition(":")
    if not module_name or not cls_name.isidentifier():
        raise UsageError(f"bad optimizer import path '{path}': expected package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import '{module_name}' for optimizer '{path}': {exc}") from exc
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UsageError(f"'{path}' is not a torch.optim.Optimizer subclass")

    def build(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        return cls(trainable_parameters(model), **args)

    package = module_name.partition(".")[0]
    # No second-moment keys: optprof does not know what this optimizer names its state, so its
    # second-moment cells stay empty (unknown), rather than 0 entries read off Adam's names.
    return OptimizerEntry(path, package, module_name, CUSTOM, f"{cls_name} from {module_name}", build)


def resolve_optimizers(selection: list[str]) -> list[OptimizerEntry]:
    """Names from -o (repeatable, comma-separated, 'all' for the whole registry) -> entries, in order."""
    names: list[str] = []
    for item in selection or list(DEFAULT_OPTIMIZERS):
        for name in (part.strip() for part in item.split(",")):
            if name == "all":
                names.extend(REGISTRY)
            elif name:
                names.append(name)
    entries: list[OptimizerEntry] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        key = name if is_import_path(name) else name.lower()
        if key in REGISTRY:
            entries.append(REGISTRY[key])
        elif is_import_path(key):
            entries.append(custom_entry(key))
        else:
            near = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(near)}?" if near else " `optprof optimizers` lists them."
            raise UsageError(f"unknown optimizer '{name}'.{hint}")
    if not entries:
        raise UsageError("no optimizer selected")
    return entries


def parse_opt_args(pairs: list[str]) -> dict[str, Any]:
    """--opt-arg key=value -> {key: value}; values are Python literals where they parse (0.9, (0.9, 0.95))."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"bad --opt-arg '{pair}': expected key=value, e.g. --opt-arg weight_decay=0.1")
        try:
            parsed[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = raw.strip()
    return parsed


def accepted_keywords(entry: OptimizerEntry) -> frozenset[str] | None:
    """The --opt-arg keys the entry's optimizer takes; None where that cannot be told (a builder of its own, a
    package not installed, or a constructor that takes **kwargs)."""
    receiver = getattr(entry.build, "receiver", None)
    if receiver is None:
        return None
    try:
        parameters = list(inspect.signature(receiver()).parameters.values())[1:]  # the first: what the builder passes
    except (ImportError, TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_opt_args(entries: list[OptimizerEntry], opt_args: Mapping[str, Any]) -> None:
    """A UsageError for an --opt-arg key that none of the selected optimizers takes (a typo, as a rule): one line
    now instead of a failed row per optimizer."""
    if not opt_args or not entries:
        return
    accepted = [accepted_keywords(entry) for entry in entries]
    if any(keys is None for keys in accepted):
        return
    known = sorted(set().union(*(keys for keys in accepted if keys is not None)))
    for key in opt_args:
        if all(keys is not None and key not in keys for keys in accepted):
            names = ", ".join(entry.name for entry in entries)
            raise UsageError(f"--opt-arg {key}: none of the selected optimizers ({names}) takes it; they take "
                             f"{', '.join(known)}")
