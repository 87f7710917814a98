"""The GitHub Action (``action.yml``): its YAML against GitHub's schemas, and its script run on a toy repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "action"))

import gate_action  # noqa: E402

TOY = '''
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.ReLU()] + [m for _ in range({extra}) for m in (nn.Linear(256, 256), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(256, 8)).eval()
'''


@pytest.mark.parametrize("schema,path", [("vendor.github-actions", "action.yml"),
                                         ("vendor.github-workflows", ".github/workflows/latency-gate.yml")])
def test_the_action_and_the_workflow_validate_against_githubs_schemas(schema, path):
    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not Path(checker).exists():
        pytest.skip("check-jsonschema is not installed (the dev extra)")
    done = subprocess.run([checker, "--builtin-schema", schema, str(ROOT / path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_example_workflow_is_a_few_lines_using_the_action():
    text = (ROOT / ".github/workflows/latency-gate.yml").read_text()
    steps = [ln for ln in text.splitlines() if ln.strip().startswith("- uses:")]
    assert steps == ["      - uses: actions/checkout@v4", "      - uses: ./"]
    assert len([ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]) <= 25


def make_toy_repo(path: Path) -> Path:
    """Two commits of a toy repository: the base model, then a head six 256x256 layers deeper (far slower)."""
    path.mkdir()

    def git(*cmd):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    (path / "toy_models.py").write_text(TOY.format(extra=0))
    git("add", ".")
    git("commit", "-q", "-m", "base")
    (path / "toy_models.py").write_text(TOY.format(extra=6))
    git("commit", "-q", "-am", "head: a deeper model")
    return path


@pytest.mark.timing
def test_the_script_on_two_commits_gates_annotates_summarises_and_writes_the_comment(tmp_path, capsys,
                                                                                     monkeypatch):
    repo = make_toy_repo(tmp_path / "toy")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.chdir(repo)
    slimx = f"{sys.executable} -m slimx.cli"
    code = gate_action.main(["--model", "toy_models:make_model", "--devices", "host,pixel7", "--baseline-ref",
                             "HEAD~1", "--out", str(tmp_path / "out"), "--slimx", slimx, "--max-regression-pct", "5",
                             "--gate-args", "--rounds 5 --runs 10 --warmup 2",
                             "--export-args", "--runs 30 --input-shape 2x64"])
    out = capsys.readouterr().out
    assert code == 1, out
    gate_file = tmp_path / "out" / "slimx-gate.toml"
    lines = gate_action.entry_lines(gate_file)
    annotations = [ln for ln in out.splitlines() if ln.startswith("::error ")]
    assert any(f"file={gate_file},line={lines['host']},title=slimx gate: host::" in a for a in annotations), out
    assert any("line={},title=slimx gate: pixel7::".format(lines["pixel7"]) in a and "(estimated)" in a
               for a in annotations), out
    text = summary.read_text()  # slimx gate appends its table to the job summary
    assert "slimx gate **failed**" in text and "| host | host | measured | candidate / baseline |" in text
    comment = (tmp_path / "out" / "comment.md").read_text()
    assert comment.startswith(gate_action.MARKER) and "slimx latency gate: failed" in comment
    assert "| host | host | measured |" in comment and "**fail**" in comment
    for side in ("head", "base"):
        assert (tmp_path / "out" / side / "host" / "report.html").is_file()
    assert json.loads((tmp_path / "out" / "gate.json").read_text())["passed"] is False
    listed = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1  # the baseline's worktree is gone


class _GitHub(BaseHTTPRequestHandler):
    """GitHub's issue-comment endpoints, kept in memory: what the action's comment code talks to."""

    comments: ClassVar[list[dict]] = []
    calls: ClassVar[list[str]] = []

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_GET(self):
        self.calls.append(f"GET {self.path.split('?')[0]}")
        assert self.headers["Authorization"] == "Bearer t0ken"
        self._reply(200, self.comments)

    def do_POST(self):
        self.calls.append(f"POST {self.path}")
        made = {"id": 100 + len(self.comments), "body": self._body()["body"]}
        self.comments.append(made)
        self._reply(201, made)

    def do_PATCH(self):
        self.calls.append(f"PATCH {self.path}")
        cid = int(self.path.rsplit("/", 1)[1])
        for c in self.comments:
            if c["id"] == cid:
                c["body"] = self._body()["body"]
        self._reply(200, {"id": cid})

    def log_message(self, *args):
        pass


def test_the_comment_is_posted_once_then_updated_in_place(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _GitHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _GitHub.comments[:] = [{"id": 1, "body": "an unrelated review comment"}]
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"pull_request": {"number": 7}}))
        monkeypatch.setenv("GITHUB_EVENT_PATH", str(event))
        monkeypatch.setenv("GITHUB_REPOSITORY", "me/toy")
        monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{server.server_port}")
        result = {"passed": False, "entries": [{"name": "host", "device": "host", "kind": "measured", "checks": [
            {"budget": "max_regression_pct", "what": "candidate / baseline", "value": 1.4, "interval": [1.3, 1.5],
             "limit": 1.05, "verdict": "fail", "rule": "the whole 90% interval past the limit"}]}]}
        first = gate_action.render_comment(result, tmp_path)
        assert gate_action._post_comment(first, "t0ken") == "posted comment 101 on #7"
        result["passed"] = True
        result["entries"][0]["checks"][0].update(value=1.01, interval=[0.99, 1.03], verdict="pass")
        second = gate_action.render_comment(result, tmp_path)
        assert gate_action._post_comment(second, "t0ken") == "updated comment 101 on #7"
        assert [c["body"] for c in _GitHub.comments] == ["an unrelated review comment", second]
        assert _GitHub.calls == ["GET /repos/me/toy/issues/7/comments", "POST /repos/me/toy/issues/7/comments",
                                 "GET /repos/me/toy/issues/7/comments", "PATCH /repos/me/toy/issues/comments/101"]
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.delenv("GITHUB_EVENT_PATH")
    assert "not posted" in gate_action._post_comment("body", "t0ken")
    assert os.environ.get("GITHUB_REPOSITORY") == "me/toy"
