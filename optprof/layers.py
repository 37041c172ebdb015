"""Repeated layers: figures measured on copies of a model's first 1, 2 and 3 layers, checked to lie on one
line in the layer count, and extrapolated to the whole model. Exact where they lie on it; the callers step the
whole model where they do not.

Only sums over the parameters (optimizer state) are extrapolated: a step's peak is the largest of several
phases' peaks, each on its own line, and which phase wins can change past the copies (GPT-2's backward peak is
on one line through 4 layers and 2.4% above it at 12), which three copies cannot show.
"""

from __future__ import annotations

COPY_LAYERS = (1, 2, 3)  # layers of the copies: two fit a line, the third checks it


def affine_at(values: list[int], layers: int) -> int | None:
    """The value at `layers` on the line through `values` at 1, 2 and 3 layers; None when they are not on one."""
    first, second, third = values
    step = second - first
    return first + (layers - 1) * step if third - second == step else None


def affine_dict(values: list[dict[str, int]], layers: int) -> dict[str, int] | None:
    """`affine_at` key by key (a key missing from a copy counts 0); None when any key is off its line."""
    keys = dict.fromkeys(key for value in values for key in value)
    found = {key: affine_at([value.get(key, 0) for value in values], layers) for key in keys}
    if None in found.values():
        return None
    return {key: v for key, v in found.items() if v is not None}
