#!/usr/bin/env python3
"""The slimx latency gate as a GitHub Action step (``action.yml`` runs this script; it also runs anywhere).

    python action/gate_action.py --model MODEL [--devices host,pixel7] [--budget-ms 40] [--max-regression-pct 5]
                                 [--gate-file FILE] [--baseline-ref REF] [--out slimx-gate] [--export-args "..."]

1. Exports MODEL twice per device: the baseline ref's (in a git worktree of that ref, so a ``pkg.module:factory``
   MODEL imports the baseline's code) and the working tree's, with the slimx installed in this environment.
2. Gates the head against the base: the given ``--gate-file``, or one written here with an entry per device
   (``max_ms`` from ``--budget-ms``, ``max_regression_pct`` against the base's export).
3. Writes the job summary (``$GITHUB_STEP_SUMMARY``), one ``::error`` annotation per failed check pointing at its
   entry in the gate file, ``OUT/comment.md`` (the pull-request comment), and with ``GITHUB_TOKEN`` posts that
   comment on the pull request, or updates the one it posted before (found by a hidden marker).
Exit status: the gate's (0 pass, 1 regression, 2 usage error).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

MARKER = "<!-- slimx-latency-gate -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="any slimx MODEL form, or an export folder (then no export)")
    ap.add_argument("--devices", default="host", help="comma-separated device names (default host)")
    ap.add_argument("--budget-ms", default=None,
                    help="absolute budget in ms: one for every device (40), or per device (host=60,iphone12=25)")
    ap.add_argument("--max-regression-pct", type=float, default=5.0, help="head against base (default 5)")
    ap.add_argument("--gate-file", default=None, help="a gate file of your own (then no entries are written)")
    ap.add_argument("--baseline-ref", default=None, help="git ref to compare with (default: the PR's base branch)")
    ap.add_argument("--out", default="slimx-gate", help="folder for exports, gate outputs and the comment")
    ap.add_argument("--export-args", default="", help="extra slimx export flags, e.g. '--input-shape 1x64'")
    ap.add_argument("--gate-args", default="", help="extra slimx gate flags, e.g. '--rounds 9'")
    ap.add_argument("--slimx", default="slimx", help="the slimx command")
    ap.add_argument("--install-base", action="store_true",
                    help="export the baseline with the baseline ref's own package, installed into a fresh virtual "
                         "environment (for a repository whose code is what the export runs, slimx's own included)")
    ap.add_argument("--repo", default=".", help="the repository (working tree = head)")
    args = ap.parse_args(argv)
    repo, out = Path(args.repo).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    gate_file = Path(args.gate_file).resolve() if args.gate_file else None
    if gate_file is None:
        ref = args.baseline_ref or _default_base()
        if not ref:
            return _usage("no --baseline-ref and no pull-request base branch (GITHUB_BASE_REF) to compare with")
        heads = {d: _export(args, repo, out / "head" / d, d) for d in devices}
        with tempfile.TemporaryDirectory(prefix="slimx-base-") as tmp:
            base_tree = Path(tmp) / "base"
            _git(repo, "worktree", "add", "--detach", str(base_tree), ref)
            try:
                base_slimx = _install(base_tree, Path(tmp) / "venv") if args.install_base else args.slimx
                bases = {d: _export(args, base_tree, out / "base" / d, d, base_slimx) for d in devices}
            finally:
                _git(repo, "worktree", "remove", "--force", str(base_tree))
        gate_file = out / "slimx-gate.toml"
        gate_file.write_text(_gate_toml(args, devices, heads, bases))
    code, result = _gate(args, gate_file, out)
    if result is None:
        return code
    _annotate(result, gate_file)
    comment = render_comment(result, out)
    (out / "comment.md").write_text(comment)
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("INPUT_GITHUB_TOKEN")
    if token:
        print(_post_comment(comment, token))
    return code


def _usage(why: str) -> int:
    print(f"slimx action: error: {why}", file=sys.stderr)
    return 2


def _default_base() -> str | None:
    base = os.environ.get("GITHUB_BASE_REF")
    return f"origin/{base}" if base else None


def _git(repo: Path, *cmd: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *cmd], check=True, capture_output=True, text=True).stdout


def _install(tree: Path, venv: Path) -> str:
    """A virtual environment with the package of ``tree`` installed (its constraints file honoured); returns the
    slimx command in it."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True)
    constraints = ["-c", str(tree / "constraints.txt")] if (tree / "constraints.txt").is_file() else []
    subprocess.run([*pip, *constraints, str(tree)], check=True)
    return str(venv / "bin" / "slimx")


def budgets(text: str | None, devices: list[str]) -> dict[str, float]:
    """``--budget-ms``: one figure for every device, or ``device=ms`` pairs.

    Example:
        >>> budgets("host=60,iphone12=25", ["host", "iphone12"])
        {'host': 60.0, 'iphone12': 25.0}
        >>> budgets("40", ["host"])
        {'host': 40.0}
    """
    if not text:
        return {}
    if "=" not in text:
        return {d: float(text) for d in devices}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value)
    return out


def _export(args, cwd: Path, dest: Path, device: str, slimx: str | None = None) -> Path:
    """``slimx export MODEL --target DEVICE`` run in ``cwd`` (the head tree or the base worktree)."""
    model = args.model
    if (Path(cwd) / model / "report.json").is_file():  # an export folder of that tree: used as it is
        return Path(cwd) / model
    if dest.exists():
        shutil.rmtree(dest)
    cmd = [*shlex.split(slimx or args.slimx), "export", model, "--target", device, "--out", str(dest), "-q",
           *shlex.split(args.export_args)]
    print(f"::group::slimx export {model} for {device} ({cwd.name})", flush=True)
    done = subprocess.run(cmd, cwd=cwd)
    print("::endgroup::", flush=True)
    if done.returncode not in (0, 1):  # 1: a failed verdict, whose report is written: the gate says the rest
        raise SystemExit(done.returncode)
    return dest


def _gate_toml(args, devices, heads, bases) -> str:
    lines = ["version = 1", "# written by slimx's GitHub Action: the working tree's export against the baseline's", ""]
    limits = budgets(args.budget_ms, devices)
    for d in devices:
        lines += ["[[gate]]", f'name = "{d}"', f'model = "{heads[d].as_posix()}"',
                  f'baseline = "{bases[d].as_posix()}"', f'device = "{d}"']
        if d in limits:
            lines.append(f"max_ms = {limits[d]}")
        lines += [f"max_regression_pct = {args.max_regression_pct}", ""]
    return "\n".join(lines)


def _gate(args, gate_file: Path, out: Path):
    cmd = [*shlex.split(args.slimx), "gate", str(gate_file), "--json", "--junit", str(out / "gate.xml"),
           "--markdown", str(out / "gate.md"), "--html", str(out / "gate.html"), *shlex.split(args.gate_args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode == 2 or not done.stdout.strip():
        print(f"::error file={gate_file},title=slimx gate::{(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        return done.returncode or 2, None
    result = json.loads(done.stdout)
    (out / "gate.json").write_text(json.dumps(result, indent=2))
    return done.returncode, result


def entry_lines(gate_file: Path) -> dict[str, int]:
    """The line of each entry's ``name = "..."`` in the gate file (1-based), for annotations."""
    out = {}
    for i, line in enumerate(gate_file.read_text().splitlines(), start=1):
        match = re.match(r'\s*name\s*=\s*"([^"]+)"', line)
        if match:
            out.setdefault(match.group(1), i)
    return out


def _annotate(result: dict, gate_file: Path) -> None:
    lines = entry_lines(gate_file)
    for entry in result.get("entries", []):
        for check in entry.get("checks", []):
            if check.get("verdict") != "fail":
                continue
            where = f"file={gate_file},line={lines.get(entry['name'], 1)}"
            interval = check.get("interval") or []
            text = (f"{entry['name']} on {entry.get('device')} ({entry.get('kind')}): {check.get('budget')} "
                    f"{check.get('what', '')} {_num(check.get('value'))}"
                    + (f" (interval {_num(interval[0])}-{_num(interval[1])})" if len(interval) == 2 else "")
                    + f" against the limit {_num(check.get('limit'))}: {check.get('rule', '')}").replace("\n", " ")
            print(f"::error {where},title=slimx gate: {entry['name']}::{text}", flush=True)


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def render_comment(result: dict, out: Path) -> str:
    """The pull-request comment: the verdict, one row per check, and where the reports are."""
    verdict = "passed" if result.get("passed") else "failed"
    lines = [MARKER, f"### slimx latency gate: {verdict}", "",
             "| entry | device | how | budget | value (interval) | limit | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in result.get("entries", []):
        for check in entry.get("checks", []) or [{}]:
            interval = check.get("interval") or []
            span = f" ({_num(interval[0])}-{_num(interval[1])})" if len(interval) == 2 else ""
            verdict = "**fail**" if check.get("verdict") == "fail" else check.get("verdict", entry.get("verdict"))
            lines.append(f"| {entry.get('name')} | {entry.get('device')} | {entry.get('kind', '')} | "
                         f"{check.get('budget', '')} {check.get('what', '')} | {_num(check.get('value'))}{span} | "
                         f"{_num(check.get('limit'))} | {verdict} |")
    notes = [f"{e.get('name')}: {w}" for e in result.get("entries", []) for w in e.get("warnings", [])]
    if notes:
        lines += ["", "<details><summary>notes</summary>", ""] + [f"- {n}" for n in notes] + ["", "</details>"]
    run = os.environ.get("GITHUB_RUN_ID")
    where = (f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{os.environ.get('GITHUB_REPOSITORY')}"
             f"/actions/runs/{run}") if run else str(out)
    lines += ["", f"Reports (gate.html, each export's report.html): {where}"]
    return "\n".join(lines) + "\n"


def _post_comment(body: str, token: str) -> str:
    """Post the comment on the pull request, or update the one with the marker; returns what was done."""
    event = os.environ.get("GITHUB_EVENT_PATH")
    number = None
    if event and Path(event).is_file():
        data = json.loads(Path(event).read_text())
        number = (data.get("pull_request") or {}).get("number") or data.get("number")
    repo = os.environ.get("GITHUB_REPOSITORY")
    if not number or not repo:
        return "no pull request in this event: comment not posted (it is in comment.md)"
    api = os.environ.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": "2022-11-28", "Content-Type": "application/json"}

    def call(method: str, url: str, payload=None):
        req = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(payload).encode() if payload is not None else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    page = 1
    while True:
        comments = call("GET", f"{api}/repos/{repo}/issues/{number}/comments?per_page=100&page={page}")
        mine = next((c for c in comments if MARKER in (c.get("body") or "")), None)
        if mine is not None:
            call("PATCH", f"{api}/repos/{repo}/issues/comments/{mine['id']}", {"body": body})
            return f"updated comment {mine['id']} on #{number}"
        if len(comments) < 100:
            break
        page += 1
    made = call("POST", f"{api}/repos/{repo}/issues/{number}/comments", {"body": body})
    return f"posted comment {made.get('id')} on #{number}"


if __name__ == "__main__":
    sys.exit(main())
