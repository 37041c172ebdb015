"""The text `optprof tune` trains and evaluates on, offline: by default the Python standard library's own source
files (on every machine that runs optprof), else the user's files (`--data`). Split by file into a training
part and a held-out part, then tokenized: by the model's own tokenizer where a local model folder has one,
else as bytes (vocabulary 256).
"""

from __future__ import annotations

import json
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optprof.errors import UsageError, read_user_file
from optprof.results.rows import CorpusInfo

if TYPE_CHECKING:
    import torch

BYTE_VOCAB = 256
HELD_OUT_EVERY = 10  # every 10th document (file, or JSONL line) is held out: about 10%
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # token ids, one dimension, documents joined
    held_out: torch.Tensor
    info: CorpusInfo


def stdlib_documents() -> tuple[str, list[tuple[str, bytes]]]:
    """The standard library's top-level *.py files, by name: (description, [(name, bytes)])."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    version = ".".join(map(str, sys.version_info[:2]))
    return f"Python {version} standard library source ({folder})", [(f.name, f.read_bytes()) for f in files]


def user_documents(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """--data: a folder (every file under it, hidden ones skipped), a text file, or a JSONL file whose lines
    carry a `text` field (one document per line)."""
    if not path.exists():
        raise UsageError(f"--data '{path}' does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = [path]
    documents: list[tuple[str, bytes]] = []
    for file in files:
        if file.suffix == ".jsonl":
            documents += _jsonl_documents(file)
        else:
            documents.append((str(file), read_user_file(file, "--data ")))
    if not any(text for _, text in documents):
        raise UsageError(f"--data '{path}' holds no text")
    return str(path), documents


def _jsonl_documents(file: Path) -> list[tuple[str, bytes]]:
    documents = []
    text = read_user_file(file, "--data ").decode(errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--data '{file}' line {number} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"--data '{file}' line {number} has no text field")
        # JSON may escape lone surrogates (\\ud800), which UTF-8 cannot hold: replaced, as bad bytes are in files
        documents.append((f"{file}:{number}", record["text"].encode(errors="replace")))
    return documents


def split(documents: Sequence[tuple[str, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """(train, held out): every HELD_OUT_EVERY-th document held out; a single document: its last tenth."""
    if len(documents) == 1:
        text = documents[0][1]
        cut = len(text) - len(text) // HELD_OUT_EVERY
        return [text[:cut]], [text[cut:]]
    held = [text for i, (_, text) in enumerate(documents) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    if not held:  # fewer than HELD_OUT_EVERY documents: the last one
        held = [documents[-1][1]]
        return [text for _, text in documents[:-1]], held
    return [text for i, (_, text) in enumerate(documents) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held


def find_tokenizer(model: str) -> Path | None:
    """The model's folder when MODEL is a local folder that holds a tokenizer; else None (bytes)."""
    folder = Path(model).expanduser()
    if folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return None


def _byte_ids(parts: list[bytes]) -> torch.Tensor:
    import torch

    joined = b"\n".join(parts)
    if not joined:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8).clone()


def _token_ids(tokenizer: object, parts: list[bytes]) -> torch.Tensor:
    """Each document tokenized, joined with the end-of-text token where the tokenizer has one."""
    import torch

    separator = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []  # type: ignore[attr-defined]
    ids: list[int] = []
    for text in parts:
        ids += tokenizer(text.decode(errors="replace"), add_special_tokens=False)["input_ids"] + separator  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.int32)


def load_corpus(model: str, data: Path | None, model_vocab: int, seq_len: int) -> Corpus:
    """The corpus for `model`: --data or the standard library, split by document, tokenized."""
    source, documents = stdlib_documents() if data is None else user_documents(data)
    train_parts, held_parts = split(documents)
    folder = find_tokenizer(model)
    if folder is None:
        train, held, vocab, tokenizer = _byte_ids(train_parts), _byte_ids(held_parts), BYTE_VOCAB, "bytes"
    else:
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load the tokenizer in '{folder}': {str(exc).splitlines()[0]}") from exc
        vocab = len(loaded)
        if vocab > model_vocab:
            raise UsageError(f"the tokenizer in '{folder}' has {vocab} tokens, more than the model's {model_vocab}")
        train, held, tokenizer = _token_ids(loaded, train_parts), _token_ids(loaded, held_parts), str(folder)
    for part, tokens in (("training", train), ("held-out", held)):
        if tokens.numel() <= seq_len:
            raise UsageError(f"the {part} text has {tokens.numel()} tokens; --seq-len {seq_len} needs more")
    info = CorpusInfo(source=source, tokenizer=tokenizer, vocab_size=vocab,
                      train_documents=len(train_parts), held_out_documents=len(held_parts),
                      train_tokens=int(train.numel()), held_out_tokens=int(held.numel()))
    return Corpus(train, held, info)
