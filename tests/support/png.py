"""PNG files as the plot tests check them: they decode, at a size."""

from __future__ import annotations

import io

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoded(data: bytes) -> tuple[int, int]:
    """(height, width) of a PNG that decodes, in pixels."""
    from matplotlib.image import imread

    assert data.startswith(PNG_SIGNATURE)
    return imread(io.BytesIO(data), format="png").shape[:2]
