"""Records to and from plain data: JSON values back into typed dataclasses, and rows flattened to CSV cells."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Union


def decode(hint: Any, value: Any) -> Any:
    """`value` (from JSON) as the type `hint` names: dataclasses, enums, tuples and dicts of them, optionals. A value
    that is not one of an enum's is a ValueError (the reader reports a damaged file)."""
    if value is None:
        return None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        known = {f.name: decode(hints[f.name], value[f.name]) for f in dataclasses.fields(hint)
                 if f.init and f.name in value}
        return hint(**known)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return decode(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], item) for item in value)
        return tuple(decode(a, item) for a, item in zip(args, value, strict=True))
    if origin is dict and args:  # JSON keys are text: an int key comes back as int
        return {(int(key) if args[0] is int else key): decode(args[1], item) for key, item in value.items()}
    if origin is list and args:
        return [decode(args[0], item) for item in value]
    return value


def flat(record: dict[str, Any]) -> dict[str, Any]:
    """CSV cells are scalars: dicts become prefixed columns, sequences ';'-joined text."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "state_dtypes":
            flat[key] = ";".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        elif key == "state_parts":  # name=parameters:state bytes
            flat[key] = ";".join(f"{p['name']}={p['parameters']}:{p['state_bytes']}" for p in value)
        elif key == "trials" and isinstance(value, list | tuple):  # tune: each trial's held-out loss, in order
            flat[key] = ";".join("nan" if t["val_loss"] is None else f"{t['val_loss']:.6g}" for t in value)
        elif key == "search":  # probes, compactly: micro-batch:fits or micro-batch:no
            flat[key] = ";".join(f"{p['micro_batch']}:{'fits' if p['fits'] else 'no'}" for p in value)
        elif isinstance(value, list | tuple):
            flat[key] = ";".join(str(v) for v in value)
        else:
            flat[key] = value
    return flat
