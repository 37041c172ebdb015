"""`optprof tune`: search spaces, the corpus, one trial, the conclusions drawn from trials, and the command."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from optprof.cli.app import app
from optprof.config import ModelSelection, TuneBudget, TuneConfig
from optprof.errors import UsageError
from optprof.optimizers.registry import REGISTRY
from optprof.results.io import load_report
from optprof.results.reports import TuneReport
from optprof.results.rows import TuneRow, TuneTrial
from optprof.tune.conclusions import (
    budgets,
    expected_best,
    inclusion_checks,
    inclusion_pairs,
    noise_range,
    ranking_by_budget,
    trial_figures,
)
from optprof.tune.corpus import BYTE_VOCAB, load_corpus, split, user_documents
from optprof.tune.run import run_tune
from optprof.tune.space import (
    DEFAULT_SPACES,
    Hyperparameter,
    halton,
    optimizer_kwargs,
    read_space_file,
    resolve_space,
    sample,
)
from optprof.tune.trial import TuneTrialSpec, run_tune_trial

TINY_BUDGET = TuneBudget(trials=2, steps=3, micro_batch=2, seq_len=16, eval_sequences=4)
TIMING_FIELDS = {"wall_s", "tokens_per_s", "tokens_per_s_ci95", "created", "environment"}


def text_folder(folder: Path, files: int = 12) -> Path:
    """Small deterministic documents: English-like lines, different per file."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["the", "optimizer", "keeps", "state", "per", "parameter", "and", "memory", "grows", "with", "it"]
    for index in range(files):
        lines = [" ".join(words[(index + line + k) % len(words)] for k in range(8)) for line in range(40)]
        (folder / f"doc{index:02d}.txt").write_text("\n".join(lines))
    return folder


# ------------------------------------------------------------------------------------------ search spaces


def test_scales_map_the_unit_interval_onto_the_range() -> None:
    lr = Hyperparameter("lr", 1e-4, 1e-1, "log")
    assert lr.value(0.0) == pytest.approx(1e-4)
    assert lr.value(0.5) == pytest.approx(math.sqrt(1e-4 * 1e-1))  # the geometric middle
    momentum = Hyperparameter("momentum", 0.0, 0.99, "log1m")
    assert momentum.value(0.0) == pytest.approx(0.0)
    assert momentum.value(0.5) == pytest.approx(0.9)  # 1 - sqrt(1 * 0.01)
    assert momentum.value(0.999999) == pytest.approx(0.99, abs=1e-5)
    assert Hyperparameter("x", 2.0, 4.0, "linear").value(0.25) == pytest.approx(2.5)


@pytest.mark.parametrize(("low", "high", "scale"), [(0.0, 1.0, "log"), (0.5, 1.0, "log1m"), (2.0, 1.0, "linear"),
                                                     (1.0, 2.0, "cubic")])
def test_a_range_that_cannot_be_sampled_is_a_usage_error(low: float, high: float, scale: Any) -> None:
    with pytest.raises(UsageError, match="search space: x"):
        Hyperparameter("x", low, high, scale)


def test_halton_is_the_radical_inverse() -> None:
    assert [halton(i, 2) for i in range(1, 5)] == [0.5, 0.25, 0.75, 0.125]
    assert halton(1, 3) == pytest.approx(1 / 3) and halton(5, 3) == pytest.approx(2 / 3 + 1 / 9)


def test_points_are_seeded_in_range_and_apart_per_optimizer() -> None:
    space = DEFAULT_SPACES["adam"]
    points = sample(space, 16, seed=0, optimizer="adam")
    assert points == sample(space, 16, seed=0, optimizer="adam")
    assert points != sample(space, 16, seed=1, optimizer="adam")
    assert points != sample(space, 16, seed=0, optimizer="nadam")
    for h in space:
        values = [p[h.name] for p in points]
        assert all(h.low <= v <= h.high for v in values)
        assert len(set(values)) == 16
    # Quasi-random: the 16 learning rates cover each quarter of the log range.
    lr = space[0]
    quarters = {int(4 * (math.log(p["lr"] / lr.low) / math.log(lr.high / lr.low))) for p in points}
    assert quarters == {0, 1, 2, 3}


def test_betas_become_one_keyword() -> None:
    assert optimizer_kwargs({"lr": 1e-3, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8}) == {
        "lr": 1e-3, "eps": 1e-8, "betas": (0.8, 0.95)}
    assert optimizer_kwargs({"lr": 0.1, "momentum": 0.5}) == {"lr": 0.1, "momentum": 0.5}


def test_space_file_overrides_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text('[adam]\nlr = [1e-3, 1e-2]\nbeta2 = 0.999\neps = {low = 1e-8, high = 1e-6, scale = "log"}\n'
                    '[lion]\nlr = [1e-5, 1e-4]\n')
    overrides = read_space_file(path, set(REGISTRY))
    adam = {h.name: h for h in resolve_space("adam", overrides)}
    assert (adam["lr"].low, adam["lr"].high, adam["lr"].scale) == (1e-3, 1e-2, "log")
    assert adam["beta2"].low == adam["beta2"].high == 0.999
    assert adam["beta1"] == DEFAULT_SPACES["adam"][1]  # untouched
    assert [h.name for h in resolve_space("lion", overrides)] == ["lr"]
    assert resolve_space("adagrad", overrides)[0].name == "lr"  # the fallback: its rate only


@pytest.mark.parametrize(("text", "message"), [("[adamm]\nlr = [1e-3, 1e-2]\n", "unknown optimizer 'adamm'"),
                                               ("[adam]\nlr = 'fast'\n", "expected a number"),
                                               ("[adam\n", "is not TOML"),
                                               ("[adam]\nlr = [0, 1]\n", "log scale")])
def test_a_bad_space_file_is_one_usage_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        read_space_file(path, set(REGISTRY))


# ------------------------------------------------------------------------------------------------ corpus


def test_split_holds_out_every_tenth_document() -> None:
    documents = [(f"d{i}", bytes([65 + i])) for i in range(20)]
    train, held = split(documents)
    assert held == [bytes([65 + 9]), bytes([65 + 19])] and len(train) == 18
    assert split([("one", b"0123456789" * 10)]) == ([b"0123456789" * 9], [b"0123456789"])
    assert split([("a", b"a"), ("b", b"b")]) == ([b"a"], [b"b"])


def test_jsonl_lines_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(3)) + "\n")
    _, documents = user_documents(path)
    assert [text for _, text in documents] == [b"document 0", b"document 1", b"document 2"]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(UsageError, match="line 1 has no text field"):
        user_documents(path)


def test_byte_corpus_from_a_folder(tmp_path: Path) -> None:
    corpus = load_corpus("tiny", text_folder(tmp_path / "data"), 128, 16)
    assert corpus.info.tokenizer == "bytes" and corpus.info.vocab_size == BYTE_VOCAB
    assert (corpus.info.train_documents, corpus.info.held_out_documents) == (11, 1)
    held = (tmp_path / "data" / "doc09.txt").read_bytes()
    assert bytes(corpus.held_out.tolist()) == held
    assert corpus.info.train_tokens == corpus.train.numel() > 10 * len(held)


def test_the_standard_library_is_the_default_corpus() -> None:
    corpus = load_corpus("demo", None, 8192, 64)
    assert corpus.info.source.startswith("Python ") and corpus.info.train_documents > 50
    assert b"def " in bytes(corpus.train[:200_000].tolist())


@pytest.mark.parametrize(("make", "message"), [(lambda p: p / "missing", "does not exist"),
                                               (lambda p: text_folder(p / "d", 2),
                                                "text has 1893 tokens; --seq-len 4096 needs more")])
def test_unusable_data_is_a_usage_error(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_corpus("tiny", make(tmp_path), 128, 4096)


def test_a_local_model_folder_with_a_tokenizer_tokenizes(tmp_path: Path, model_dir: Callable[[str], str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "optimizer", "keeps", "state", "per", "parameter", "and", "memory", "grows", "with", "it"]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = model_dir("tiny-llama")
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    corpus = load_corpus(folder, text_folder(tmp_path / "data"), 128, 16)
    assert corpus.info.tokenizer == folder and corpus.info.vocab_size == len(vocab)
    assert int(corpus.train.max()) < len(vocab) and int(corpus.train.min()) >= 1  # words and separators, no UNK
    with pytest.raises(UsageError, match="more than the model's 8"):
        load_corpus(folder, text_folder(tmp_path / "data"), 8, 16)


# ------------------------------------------------------------------------------------------------ one trial


@pytest.fixture
def corpus(tmp_path: Path) -> Any:
    return load_corpus("tiny", text_folder(tmp_path / "data"), 128, TINY_BUDGET.seq_len)


def trial(model: str, corpus: Any, optimizer: str, hyperparameters: dict[str, float], seed: int = 0) -> TuneTrial:
    spec = TuneTrialSpec(ModelSelection(model), REGISTRY[optimizer], hyperparameters, 0, seed,
                         dataclasses.replace(TINY_BUDGET, steps=6), overrides={"vocab_size": BYTE_VOCAB})
    return run_tune_trial(spec, corpus.train, corpus.held_out)


def test_a_trial_trains_and_scores_on_held_out_text(model_dir: Callable[[str], str], corpus: Any) -> None:
    model = model_dir("tiny-llama")
    result = trial(model, corpus, "adam", {"lr": 1e-2})
    assert result.status == "ok" and not result.diverged
    assert len(result.train_losses) == 6
    assert result.first_loss == pytest.approx(math.log(BYTE_VOCAB), abs=0.1)  # an untrained model guesses evenly
    assert result.val_loss is not None and result.val_loss < result.first_loss - 0.3
    params = sum(p.numel() for p in _tiny(model).parameters())
    assert result.state_bytes == 2 * 4 * params + 4 * len(list(_tiny(model).parameters()))  # m, v; a step each
    again = trial(model, corpus, "adam", {"lr": 1e-2})
    assert (again.val_loss, again.train_losses) == (result.val_loss, result.train_losses)  # seeded
    other = trial(model, corpus, "adam", {"lr": 1e-2}, seed=1)
    assert other.val_loss != result.val_loss


def _tiny(model: str) -> Any:
    from optprof.model.loading import load_model

    return load_model(model, overrides={"vocab_size": BYTE_VOCAB}).module


def test_a_trial_that_blows_up_is_diverged_not_failed(model_dir: Callable[[str], str], corpus: Any) -> None:
    result = trial(model_dir("tiny-llama"), corpus, "sgd", {"lr": 1e6})
    assert result.status == "ok" and result.diverged
    assert result.val_loss is None or result.val_loss > (result.first_loss or 0)


def test_an_optimizer_that_cannot_run_here_is_unsupported(model_dir: Callable[[str], str], corpus: Any) -> None:
    pytest.importorskip("lomo_optim")
    result = trial(model_dir("tiny-llama"), corpus, "adalomo", {"lr": 1e-3})
    assert result.status == "unsupported" and "CUDA" in (result.reason or "")


# ---------------------------------------------------------------------------------------------- conclusions


def test_expected_best_averages_over_every_order() -> None:
    scores = [3.0, 1.0, 4.0, 1.5, 9.0]
    for drawn in range(1, 6):
        orders = list(itertools.permutations(scores))
        brute = statistics.fmean(min(order[:drawn]) for order in orders)
        assert expected_best(scores, drawn) == pytest.approx(brute)
    assert budgets(8) == [1, 2, 4, 8] and budgets(6) == [1, 2, 4, 6] and budgets(1) == [1]


def t(index: int, loss: float | None, diverged: bool = False, first: float = 5.5, seed: int = 0) -> TuneTrial:
    return TuneTrial(index=index, hyperparameters={"lr": 0.1 * (index + 1)}, seed=seed, status="ok", val_loss=loss,
                     diverged=diverged, first_loss=first, tokens_per_s=1000.0 + index, state_bytes=8)


def test_the_best_never_diverged_and_the_median_counts_divergence_at_the_start() -> None:
    figures = trial_figures([t(0, 3.0), t(1, 2.0, diverged=True), t(2, 4.0), t(3, None, diverged=True)])
    assert (figures["best_val_loss"], figures["best_trial"]) == (3.0, 0)
    assert figures["best_hyperparameters"] == {"lr": 0.1}
    assert figures["median_val_loss"] == pytest.approx(statistics.median([3.0, 5.5, 4.0, 5.5]))
    assert figures["diverged_fraction"] == 0.5


def test_noise_is_the_seed_range_of_the_reruns_that_trained() -> None:
    best = t(0, 3.0)
    assert noise_range(best, [t(0, 3.2, seed=1), t(0, 2.9, seed=2)]) == pytest.approx(0.3)
    assert noise_range(best, [t(0, 3.1, seed=1), t(0, 9.0, diverged=True, seed=2)]) == pytest.approx(0.1)
    assert noise_range(best, []) is None


def row(name: str, best: float | None, noise: float | None = None) -> TuneRow:
    return TuneRow(optimizer=name, package="torch", package_version=None, family="sgd", status="ok",
                   best_val_loss=best, noise_range=noise, trials=(t(0, best),) if best is not None else ())


def test_inclusion_holds_within_the_measured_noise_and_shows_violations() -> None:
    pairs = inclusion_pairs((("sgd", "momentum", "adam"),))
    assert pairs == [("sgd", "momentum"), ("sgd", "adam"), ("momentum", "adam")]
    checks = {(c.special, c.general): c for c in inclusion_checks(
        [row("sgd", 3.0, 0.05), row("momentum", 3.04, 0.01), row("adam", 3.2, 0.02)], pairs)}
    assert checks["sgd", "momentum"].holds and checks["sgd", "momentum"].gap == pytest.approx(0.04)
    assert checks["sgd", "momentum"].margin == 0.05  # the larger of the two
    violated = checks["momentum", "adam"]
    assert violated.holds is False and violated.gap == pytest.approx(0.16) and violated.margin == 0.02
    assert inclusion_checks([row("sgd", 3.0), row("momentum", None)], pairs)[0].holds is None
    assert inclusion_checks([row("sgd", 3.0)], pairs) == ()  # momentum not tuned: nothing to check


def test_ranking_by_budget_settles_on_the_best_trials() -> None:
    rows = [dataclasses.replace(row("sgd", 3.0), trials=(t(0, 3.0), t(1, 5.0), t(2, 3.5), t(3, 6.0))),
            dataclasses.replace(row("adam", 2.5), trials=(t(0, 9.0, diverged=True, first=5.5), t(1, 2.5),
                                                          t(2, 5.4), t(3, 5.45)))]
    ranking = ranking_by_budget(rows)
    assert [r.trials for r in ranking] == [1, 2, 4]
    assert ranking[0].ranking == ("sgd", "adam")  # one trial: sgd's are better on average
    assert ranking[0].expected_best_val_loss["adam"] == pytest.approx((5.5 + 2.5 + 5.4 + 5.45) / 4)
    assert ranking[-1].ranking == ("adam", "sgd")
    assert ranking[-1].expected_best_val_loss == {"sgd": 3.0, "adam": 2.5}


# ------------------------------------------------------------------------------------------------ the command


def _figures(report: TuneReport) -> dict[str, Any]:
    """The report without what timing makes differ between runs."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list | tuple):
            return [strip(v) for v in value]
        return value

    return strip(report.to_dict())


def test_same_seed_same_figures_whatever_the_workers(model_dir: Callable[[str], str], tmp_path: Path) -> None:
    config = TuneConfig(ModelSelection(model_dir("tiny-llama")), ("sgd", "momentum", "adam"), TINY_BUDGET,
                        noise_seeds=1, jobs=2, data=str(text_folder(tmp_path / "data")))
    first = run_tune(config)
    assert _figures(first) == _figures(run_tune(config))
    one_worker = _figures(run_tune(dataclasses.replace(config, jobs=1)))  # its config and notes say jobs 1
    assert all(_figures(first)[key] == one_worker[key] for key in ("results", "inclusion", "ranking_by_budget"))
    assert _figures(first) != _figures(run_tune(dataclasses.replace(config, seed=1)))
    assert [r.optimizer for r in first.results] == ["sgd", "momentum", "adam"]
    for result in first.results:
        assert result.status == "ok" and len(result.trials) == 2
        assert [t.index for t in result.trials] == [0, 1] and {t.seed for t in result.trials} == {0}
        assert result.noise_seeds == ((1,) if result.best_trial is not None else ())
    assert {(c.special, c.general) for c in first.inclusion} == {("sgd", "momentum"), ("sgd", "adam"),
                                                                 ("momentum", "adam")}
    assert [b.trials for b in first.ranking_by_budget] == [1, 2]
    assert load_report(json.loads(first.to_json())) == first


def test_cli_tune_json_has_the_schema(model_dir: Callable[[str], str], tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    args = ["tune", model_dir("tiny-llama"), "-o", "sgd,adam", "--trials", "2", "--steps", "2", "--micro-batch", "2",
            "--seq-len", "16", "--eval-sequences", "2", "--noise-seeds", "1", "--data",
            str(text_folder(tmp_path / "data")), "--output", str(out), "--plot", str(tmp_path / "tune.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Inclusion" in result.output and "sgd ⊆ adam" in result.output
    data = json.loads(out.read_text())
    assert (data["schema"], data["schema_version"]) == ("optprof.tune", 1)
    for entry in data["results"]:
        assert {"optimizer", "best_val_loss", "best_hyperparameters", "trials", "state_bytes", "tokens_per_s"} <= set(
            entry)
        assert {"hyperparameters", "val_loss", "diverged"} <= set(entry["trials"][0])
    assert {"general", "special", "holds", "gap"} <= set(data["inclusion"][0])
    assert data["ranking_by_budget"][0]["trials"] == 1
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
    rendered = CliRunner().invoke(app, ["report", str(out)])
    assert rendered.exit_code == 0 and "Quality at equal budget" in rendered.output
    csv = CliRunner().invoke(app, ["report", str(out), "-f", "csv"])
    assert csv.exit_code == 0 and csv.output.splitlines()[0].startswith("model,")


def test_cli_tune_bad_space_is_one_line(tmp_path: Path) -> None:
    from optprof.cli.app import main

    space = tmp_path / "space.toml"
    space.write_text("[adam]\nlr = [0, 1]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--space", str(space), "--trials", "1"])
    assert exit_info.value.code == 2


def test_default_model_and_corpus_twice_give_identical_json() -> None:
    """The must-show of the issue, on a reduced budget: the bundled demo model, the standard library's text."""
    args = ["tune", "-o", "sgd,adam", "--trials", "2", "--steps", "2", "--eval-sequences", "4", "--noise-seeds", "1",
            "-f", "json"]
    runs = [CliRunner().invoke(app, args) for _ in range(2)]
    assert all(run.exit_code == 0 for run in runs), runs[0].output
    first, second = (TuneReport.from_json(run.stdout) for run in runs)
    assert isinstance(first, TuneReport) and _figures(first) == _figures(second)
    assert first.corpus.source.startswith("Python ") and first.model.vocab_size == BYTE_VOCAB
    assert all(row.best_val_loss is not None and row.best_val_loss < math.log(BYTE_VOCAB) for row in first.results)


def test_a_missing_package_is_an_unavailable_row(model_dir: Callable[[str], str], tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed here")
    config = TuneConfig(ModelSelection(model_dir("tiny-llama")), ("sgd", "adamw8bit-torchao"), TINY_BUDGET,
                        noise_seeds=0, data=str(text_folder(tmp_path / "data")))
    report = run_tune(config)
    missing = report.results[1]
    assert (missing.status, missing.trials) == ("unavailable", ()) and "torchao" in (missing.reason or "")
    assert report.results[0].status == "ok" and not report.failed
    assert report.results[0].noise_range is None and report.inclusion == ()


def test_a_broken_optimizer_fails_its_row_and_keeps_the_others(model_dir: Callable[[str], str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = TuneConfig(ModelSelection(model_dir("tiny-llama")), ("support.optimizers:BrokenOptimizer", "sgd"),
                        TINY_BUDGET, noise_seeds=0, data=str(text_folder(tmp_path / "data")))
    report = run_tune(config)
    broken, sgd = report.results
    assert broken.status == "failed" and "broken on purpose" in (broken.reason or "")
    assert all(t.status == "failed" for t in broken.trials) and broken.best_val_loss is None
    assert sgd.status == "ok" and sgd.best_val_loss is not None
    assert report.failed


def test_a_byte_model_keeps_no_special_token_past_its_vocabulary() -> None:
    from transformers import LlamaConfig

    from optprof.tune.run import byte_vocabulary

    config = LlamaConfig(vocab_size=1000, pad_token_id=999, bos_token_id=1, eos_token_id=[2, 500])
    assert byte_vocabulary(config, 256) == {"vocab_size": 256, "pad_token_id": None, "eos_token_id": None}


def test_a_file_that_cannot_be_read_is_one_usage_error(tmp_path: Path) -> None:
    from optprof.errors import read_user_file

    with pytest.raises(UsageError, match=r"cannot read --space '.*': Is a directory"):
        read_user_file(tmp_path, "--space ")
    with pytest.raises(UsageError, match="cannot read --space"):
        read_space_file(tmp_path, set(REGISTRY))


def test_a_budget_that_cannot_train_is_a_usage_error(model_dir: Callable[[str], str]) -> None:
    config = TuneConfig(ModelSelection(model_dir("tiny-llama")), ("sgd",), dataclasses.replace(TINY_BUDGET, seq_len=1))
    with pytest.raises(UsageError, match="--seq-len must be at least 2, got 1"):
        run_tune(config)
