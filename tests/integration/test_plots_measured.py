"""Pictures of a measured run: compare's --plot PNG and its self-contained HTML page."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from support.cli import run
from support.png import PNG_SIGNATURE, decoded


def test_compare_plot_and_html_report(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    saved, page, plot = tmp_path / "run.json", tmp_path / "run.html", tmp_path / "run.png"
    code, _, _ = run(["compare", "demo", "--device", "cpu", "-o", "adamw,sgd", "--micro-batch", "1", "--seq-len",
                      "32", "--steps", "2", "--output", str(saved), "--plot", str(plot)], capsys)
    assert code == 0
    decoded(plot.read_bytes())

    code, _, _ = run(["report", str(saved), "-f", "html", "--output", str(page)], capsys)
    assert code == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http" not in text.split("<body>")[1]
    for name in ("adamw", "sgd"):
        assert re.search(rf">\s*{name}\s*<|\b{name}\b", text)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 1
    height, _ = decoded(base64.b64decode(images[0]))
    assert height >= 600  # memory and predicted-against-measured panels
    assert "Environment" in text and "Configuration" in text

    code, _, _ = run(["report", str(saved), "--plot", str(tmp_path / "again.png")], capsys)
    assert code == 0 and (tmp_path / "again.png").read_bytes().startswith(PNG_SIGNATURE)
