"""Where users already work: the GitHub Action's script on a toy repository, model cards rendered in headless
Chromium, and an MLflow run read back.

    python bench/ecosystem_demo.py      # needs chromium-headless-shell for the two screenshots

1. ``action/gate_action.py`` on two commits of a toy repository (the head's model six layers deeper), devices host
   (measured) and pixel7 (estimated): the job summary, the ``::error`` annotations and the pull-request comment.
2. ``slimx card``: MiniLM exported for iphone12, and the front of a small sweep (two recipes on a tiny encoder for
   host and iphone12); both cards rendered from Markdown to HTML and screenshot in headless Chromium.
3. ``--track mlflow``: the MiniLM export logged to a local MLflow store and read back with ``MlflowClient``.
Writes bench/results/ecosystem_demo.md and card_minilm_iphone12.png, card_sweep_front.png.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "action"))
sys.path.insert(0, str(ROOT))

from report_html import screenshot  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def action_part(work: Path) -> list[str]:
    import gate_action

    from tests.test_action import make_toy_repo

    repo = make_toy_repo(work / "toy")
    summary = work / "summary.md"
    os.environ["GITHUB_STEP_SUMMARY"] = str(summary)
    os.environ.pop("GITHUB_TOKEN", None)
    cwd = os.getcwd()
    os.chdir(repo)
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer):
            code = gate_action.main(["--model", "toy_models:make_model", "--devices", "host,pixel7",
                                     "--baseline-ref", "HEAD~1", "--out", str(work / "gate"),
                                     "--slimx", f"{sys.executable} -m slimx.cli", "--max-regression-pct", "5",
                                     "--budget-ms", "host=50,pixel7=20", "--gate-args", "--rounds 7 --runs 15",
                                     "--export-args", "--input-shape 2x64"])
    finally:
        os.chdir(cwd)
        os.environ.pop("GITHUB_STEP_SUMMARY", None)
    out = buffer.getvalue()
    annotations = [ln.replace(str(work), "$WORK") for ln in out.splitlines() if ln.startswith("::error")]
    comment = (work / "gate" / "comment.md").read_text().replace(str(work), "$WORK")
    gate_toml = (work / "gate" / "slimx-gate.toml").read_text().replace(str(work), "$WORK")
    return ["## 1. The action's script on two commits of a toy repository", "",
            f"`python action/gate_action.py --model toy_models:make_model --devices host,pixel7 --baseline-ref HEAD~1 "
            f"--max-regression-pct 5 --budget-ms host=50,pixel7=20` in a repository whose second commit makes the "
            f"model six 256x256 layers deeper. Exit status {code}.", "",
            "The gate file it wrote:", "", "```toml", gate_toml.strip(), "```", "",
            "The annotations (GitHub shows each on the gate file's line):", "", "```",
            *annotations, "```", "", "The job summary (`$GITHUB_STEP_SUMMARY`, written by `slimx gate`):", "",
            summary.read_text().replace(str(work), "$WORK").strip(), "",
            "The pull-request comment (`comment.md`; posted, or updated in place, with `github-token`), rendered:",
            "", comment.strip(), ""]


def cards_part(work: Path) -> list[str]:
    import markdown

    from slimx.cli import main as slimx

    minilm = work / "minilm-iphone12"
    if slimx(["export", "minilm", "--target", "iphone12", "--out", str(minilm), "-q"]) != 0:
        raise SystemExit("the MiniLM export failed")
    card = Path(subprocess.run([sys.executable, "-m", "slimx.cli", "card", str(minilm)], capture_output=True,
                               text=True, check=True).stdout.strip())
    sweep_file = work / "sweep.toml"
    sweep_file.write_text('version = 1\nmodels = ["tests.models:tiny_vit_block"]\ndevices = ["host", "iphone12"]\n'
                          'runs = 30\nmin_fidelity = 0.5\n[[recipe]]\nname = "plain"\n[[recipe]]\nname = "lowrank"\n'
                          'passes = ["lowrank:rank_ratio=0.5"]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "slimx.cli", "sweep", str(sweep_file), "--out", str(work / "sweep"),
                    "-q"], env=env, cwd=ROOT)
    front = work / "sweep" / "README.md"
    shots = []
    for name, path in (("card_minilm_iphone12", card), ("card_sweep_front", front)):
        body = path.read_text().split("---", 2)[2]  # the Markdown after the YAML metadata
        html = markdown.markdown(body, extensions=["tables", "fenced_code"])
        page = path.with_suffix(".html")
        page.write_text("<!doctype html><meta charset=utf-8><style>body{font:14px sans-serif;max-width:1100px;"
                        "margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
                        "vertical-align:top}code{background:#f4f4f4}</style>" + html)
        console = screenshot(page, RESULTS / f"{name}.png", height=1450 if "minilm" in name else 560)
        shots.append(f"- `bench/results/{name}.png` ({path.name}; console messages: {len(console)})")
    return ["## 2. Model cards", "", *shots, "", "The MiniLM card (Markdown as written, metadata first):", "",
            "```markdown", card.read_text().replace(str(work), "$WORK").strip(), "```", "",
            "The sweep's front card:", "", "```markdown", front.read_text().replace(str(work), "$WORK").strip(),
            "```", ""]


def tracking_part(work: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    from slimx.report import read_report
    from slimx.tracking import log_export, parse_track

    store = work / "mlruns"
    minilm = work / "minilm-iphone12"
    record = log_export(parse_track(f"mlflow:{store}"), read_report(minilm, "demo"), minilm)
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    run = client.get_run(record["run_id"])
    files = sorted(f.path for f in client.list_artifacts(run.info.run_id))
    metrics = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(run.data.metrics.items()))
    params = ", ".join(f"{k}={v}" for k, v in sorted(run.data.params.items()))
    tags = ", ".join(f"{k}={v}" for k, v in sorted(run.data.tags.items()) if k.startswith("slimx."))
    return ["## 3. The MiniLM export as an MLflow run, read back", "",
            f"`slimx export minilm --target iphone12 --track mlflow:STORE` (here `slimx.tracking.log_export` on the "
            f"same folder). Run `{run.info.run_name}` in experiment `{record['experiment']}`, status "
            f"{run.info.status}.", "", "| metric | value |", "| --- | --- |", metrics, "",
            f"Parameters: {params.replace(str(work), '$WORK')}", "", f"Tags: {tags.replace(str(work), '$WORK')}", "",
            f"Artifacts: {', '.join(files)}", ""]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="slimx-eco-"))
    RESULTS.mkdir(exist_ok=True)
    lines = ["# Where users already work: the Action, model cards, MLflow", "",
             "Written by `python bench/ecosystem_demo.py` (temporary paths shown as `$WORK`).", ""]
    lines += action_part(work)
    lines += cards_part(work)
    lines += tracking_part(work)
    (RESULTS / "ecosystem_demo.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"wrote": str(RESULTS / "ecosystem_demo.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
