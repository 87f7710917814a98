"""Screenshots of slimx's HTML reports in headless Chromium, committed under ``bench/results/``.

    python bench/report_html.py          # needs chromium-headless-shell (apt-get install chromium-headless-shell)

Exports MiniLM (real weights) with 64 stdlib sentences as calibration text and a low-rank pass with recovery,
gates the result on the host against the uncompressed export, and takes a full-page screenshot of the export's
``report.html`` and of the gate's HTML report. Checks that Chromium logs no console message for either page.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def screenshot(page: Path, png: Path, height: int = 3600) -> list[str]:
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        raise SystemExit("headless Chromium is not installed: apt-get install chromium-headless-shell")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size=1200,{height}", f"--screenshot={png}", "--enable-logging=stderr",
                           "--v=0", page.as_uri()], capture_output=True, text=True, timeout=180)
    if not png.is_file():
        raise SystemExit(f"no screenshot of {page}: {proc.stderr[-500:]}")
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line]


def main() -> int:
    from slimx.cli import main as slimx
    from slimx.export.textdata import stdlib_sentences

    work = Path(tempfile.mkdtemp(prefix="slimx-bench-html-"))
    try:
        calib = work / "calib.txt"
        calib.write_text("\n".join(stdlib_sentences(64, 0)) + "\n")
        common = ["--calib", str(calib), "--calib-samples", "64", "--runs", "30", "-q"]
        for name, extra in (("base", []), ("lrt", ["--pass", "lowrank:rank_ratio=0.5,exclude=attention|pooler",
                                                   "--recover", "steps=40", "--min-fidelity", "0.5"])):
            if slimx(["export", "minilm", "--out", str(work / name), *common, *extra]) != 0:
                raise SystemExit(f"export {name} failed")
        slimx(["gate", str(work / "lrt"), "--baseline", str(work / "base"), "--max-regression-pct", "5",
               "--budget-ms", "100", "--html", str(work / "gate.html"), "-q"])
        RESULTS.mkdir(exist_ok=True)
        console = screenshot(work / "lrt" / "report.html", RESULTS / "report_html.png")
        console += screenshot(work / "gate.html", RESULTS / "gate_html.png", height=1400)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {RESULTS / 'report_html.png'} and {RESULTS / 'gate_html.png'}; console messages: {len(console)}")
    for line in console:
        print(f"  {line}")
    return 1 if console else 0


if __name__ == "__main__":
    sys.exit(main())
