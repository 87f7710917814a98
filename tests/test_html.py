"""report.html: written by every export and eval (and profile / gate with --html), self-contained (no script, no
fetched resource), with the report's sections and charts; rendered in headless Chromium where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from slimx.cli import main
from slimx.html import pareto_front

FAST = ["--runs", "30", "--warmup", "1", "-q"]
VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "circle", "line", "polyline", "path"}


class _Checker(HTMLParser):
    """Tags must close in order (SVG elements may self-close); collects what a self-contained page must not have."""

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.problems, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and re.match(r"(https?:)?//", value):
                self.problems.append(f"fetches {value}")
        if tag == "script":
            self.problems.append("has a script")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def _check(path: Path) -> list[str]:
    checker = _Checker()
    checker.feed(path.read_text())
    assert not checker.problems and not checker.stack, (checker.problems, checker.stack)
    return checker.tags


def test_export_and_eval_write_a_self_contained_html_report(tmp_path, tiny_st_dir, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(["the cat sat on the mat", "a dog runs fast", "the small phone is fast",
                                "text of the model", "it is a cat", "this is a dog", "the model runs",
                                "a phone and a device"]) + "\n")
    out = tmp_path / "o"
    assert main(["export", f"hf:{tiny_st_dir}", "--input-shape", "1x16", "--calib", str(calib), "--out", str(out),
                 "--pass", "lowrank:rank_ratio=0.5", *FAST]) == 0
    assert "report.html" in capsys.readouterr().out
    tags = _check(out / "report.html")
    page = (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    for heading in ("Overview", "Stages", "Parity", "Latency", "Compression", "Versions"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert tags.count("svg") >= 3, "stage, per-op and sequence-length charts"
    assert "latency over sequence lengths" in page and "per op, measured (host)" in page
    assert f"{report['parity']['cosine']:.6f}" in page and "lowrank" in page
    assert main(["eval", str(out), "--data", str(calib), "--runs", "30"]) == 0
    _check(out / "eval.html")
    assert "<h2>Fidelity</h2>" in (out / "eval.html").read_text()


def test_profile_writes_html_with_the_estimate(tmp_path, capsys):
    page = tmp_path / "p.html"
    assert main(["profile", "tests.models:tiny_vit_block", "--device", "iphone12", "--html", str(page), "-q"]) == 0
    capsys.readouterr()
    _check(page)
    text = page.read_text()
    assert "estimated (not measured: no device here)" in text and "80% interval" in text and "per module" in text
    assert "for a setup not anchored" in text and "slimx devices anchor iphone12" in text
    assert main(["profile", "tests.models:tiny_mlp", "--html", str(tmp_path / "no" / "p.html")]) == 2


def test_pareto_front_keeps_the_undominated_points():
    assert pareto_front([(2.0, 0.9), (1.0, 0.8), (3.0, 0.85), (4.0, 0.99)]) == [(1.0, 0.8), (2.0, 0.9), (4.0, 0.99)]


@pytest.mark.skipif(shutil.which("chromium-headless-shell") is None and shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (apt-get install chromium-headless-shell)")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "o"
    assert main(["export", "tests.models:tiny_vit_block", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,1600", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                           (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    with Image.open(shot) as img:
        gray = img.convert("L")
        assert img.size == (1200, 1600) and len(set(gray.getdata())) > 20, "the page drew text and charts"
