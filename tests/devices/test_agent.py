"""The remote device agent on loopback: real onnxruntime and LiteRT runners behind the real uvicorn server, and
every limit it has (token, size, zip bombs, slow clients, malformed requests, queue and connection limits)."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
import zipfile

import pytest
import torch

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.inputs import sample_inputs
from slimx.devices import agent_http
from slimx.devices.agent import Agent, RemoteRunner, pack, read_token, serve
from slimx.targets import CompileOptions, get_target
from tests.models import TinyMLP, seeded

TOKEN = "loopback-test-token-0123456789"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from slimx._core.inputs import InputSpec
    from slimx.export.program import Program, export_program

    seeded(0)
    model = TinyMLP().eval()
    example = model.example_inputs()
    program = Program("tiny", export_program(model, example), model, [InputSpec("x", (2, 16))], ["y"])
    out = {}
    for fmt in ("onnx", "tflite", "executorch"):
        target = get_target(fmt)
        if not target.available:
            continue
        folder = tmp_path_factory.mktemp(fmt)
        out[fmt] = target.compile(program, None, CompileOptions(), folder)
    out["inputs"] = sample_inputs(program.inputs, seed=3)
    return out


class _Server:
    def __init__(self, **kw):
        self.log: list[str] = []
        self.agent = Agent(TOKEN, log=self.log.append, **kw)
        self.server = serve(self.agent, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.server.started and time.time() < deadline:
            time.sleep(0.01)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def request(self, method: str, path: str, body: bytes = b"", token: str | None = TOKEN, headers=None,
                length: int | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = {"Content-Length": str(len(body) if length is None else length)} if method == "POST" else {}
        if token:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        conn.request(method, path, body=body if method == "POST" else None, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data, dict(resp.getheaders())

    def post(self, path: str, body: bytes, token: str | None = TOKEN, length: int | None = None):
        status, data, _ = self.request("POST", path, body, token=token, length=length)
        return status, data

    def raw(self, data: bytes, wait: float = 20.0) -> bytes:
        """Send raw bytes and read whatever comes back until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except (TimeoutError, ConnectionResetError):
                pass
        return b"".join(chunks)


@pytest.fixture(scope="module")
def agent():
    server = _Server(max_upload=2 << 20, job_timeout=120)
    yield server
    server.close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_info_needs_the_token_as_a_bearer_header(agent):
    runner = RemoteRunner(agent.url, TOKEN, "onnxruntime")
    info = runner.info()
    assert "onnxruntime" in info["runners"] and info["max_upload_bytes"] == 2 << 20
    with pytest.raises(UsageError, match="refused the token"):
        RemoteRunner(agent.url, "wrong-token-wrong-token", "onnxruntime").info()
    assert agent.post("/v1/run", b"x", token=None)[0] == 401
    status, _, headers = agent.request("GET", "/v1/info", token=None, headers={"Authorization": TOKEN})
    assert status == 401 and headers.get("www-authenticate") == "Bearer", "a bare token without 'Bearer' is refused"
    status, data, _ = agent.request("GET", f"/v1/info?token={TOKEN}", token=None)
    assert status == 400 and b"Authorization: Bearer" in data
    assert agent.request("GET", "/v1/info", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    assert agent.log and not any(TOKEN in line for line in agent.log), "the token is never logged"


def test_onnx_job_is_timed_on_the_agent(agent, artifacts):
    runner = RemoteRunner(agent.url, TOKEN, "onnxruntime")
    timing = runner.time(artifacts["onnx"], artifacts["inputs"], warmup=2, runs=7)
    assert timing.runtime == "onnxruntime" and timing.runs == 7
    assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
    assert runner.last["outputs"] == [[2, 8]]


def test_litert_job_is_timed_on_the_agent(agent, artifacts):
    if "tflite" not in artifacts:
        pytest.skip("litert-torch / ai-edge-litert not installed")
    runner = RemoteRunner(agent.url, TOKEN, "litert")
    timing = runner.time(artifacts["tflite"], artifacts["inputs"], warmup=1, runs=5)
    assert timing.runtime == "litert" and timing.runs == 5 and timing.median_ms > 0


def test_executorch_job_is_timed_on_the_agent(agent, artifacts):
    if "executorch" not in artifacts:
        pytest.skip("executorch not installed (the optional extra)")
    runner = RemoteRunner(agent.url, TOKEN, "executorch")
    timing = runner.time(artifacts["executorch"], artifacts["inputs"], warmup=1, runs=5)
    assert timing.runtime == "executorch" and timing.runs == 5 and timing.median_ms > 0
    assert runner.last["outputs"] == [[2, 8]]


def test_oversized_uploads_are_refused_before_and_while_reading(agent):
    status, data = agent.post("/v1/run?runner=onnxruntime", b"0" * 16, length=3 << 20)
    assert status == 413 and b"over this agent's limit" in data
    # a chunked body declares no length: the cap is enforced on the bytes as they stream in
    chunk = b"0" * (1 << 20)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    answer = agent.raw(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode() + body)
    assert answer.startswith(b"HTTP/1.1 413") and b"while streaming" in answer


def test_corrupt_and_non_artifact_uploads_are_refused(agent, artifacts):
    status, data = agent.post("/v1/run?runner=onnxruntime", _zip({"artifact/model.onnx": b"not a protobuf",
                                                                   "inputs.npz": b""}))
    assert status == 422 and b"corrupt ONNX" in data
    for name in ("artifact/model.py", "artifact/model.pt", "artifact/weights.pkl"):
        status, data = agent.post("/v1/run?runner=onnxruntime", _zip({name: b"import os"}))
        assert status == 415, (name, data)
    status, data = agent.post("/v1/run?runner=onnxruntime", _zip({"../evil.onnx": b"x"}))
    assert status == 422 and b"unsafe path" in data
    status, data = agent.post("/v1/run?runner=onnxruntime", b"plain bytes, not a zip")
    assert status == 422 and b"not a zip" in data
    status, data = agent.post("/v1/run?runner=litert", pack(artifacts["onnx"].path, artifacts["inputs"], ["x"]))
    assert status == 422 and b"runs .tflite files" in data
    for query, needle in (("runner=nope", b"unknown runner"), ("runner=onnxruntime&runs=0", b"runs 1..10000"),
                          ("runner=onnxruntime&warmup=x", b"bad query")):
        status, data = agent.post(f"/v1/run?{query}", b"x")
        assert status == 400 and needle in data, (query, data)


def _bomb(declared_small: bool) -> bytes:
    """A zip of 64 MiB of zeros (about 64 KiB packed); ``declared_small``: its headers claim 1 KiB unpacked."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("artifact/model.onnx", "w") as fh:
            for _ in range(64):
                fh.write(bytes(1 << 20))
    data = bytearray(buf.getvalue())
    if declared_small:  # the uncompressed size in the local and central headers; the data still inflate to 64 MiB
        small = (1024).to_bytes(4, "little")
        local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
        data[local + 22:local + 26] = small
        data[central + 24:central + 28] = small
    return bytes(data)


def test_zip_bombs_are_refused_with_memory_and_disk_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # pick TMPDIR up again: the agent's work folders go there
    server = _Server(max_upload=4 << 20)
    try:
        status, data = server.post("/v1/run?runner=onnxruntime", _bomb(declared_small=False))
        assert status == 413 and b"declares more than" in data
        status, data = server.post("/v1/run?runner=onnxruntime", _bomb(declared_small=True))
        assert status in (413, 422) and (b"unpacked past" in data or b"corrupt" in data), data
    finally:
        server.close()
    assert not list(tmp_path.glob("slimx-agent-*")), "every work folder is removed"


def test_pickled_inputs_are_refused(agent, artifacts):
    import pickle

    body = _zip({"artifact/model.onnx": artifacts["onnx"].path.read_bytes(),
                 "inputs.npz": pickle.dumps({"x": [1, 2]})})
    status, data = agent.post("/v1/run?runner=onnxruntime", body)
    assert status == 422 and b"runner failed" in data


def test_client_disconnecting_mid_upload_leaves_the_agent_serving(agent):
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Length: 100000\r\n\r\n".encode() + b"PK" * 500)
    sock.close()
    deadline = time.time() + 10
    while not any("mid-upload" in line for line in agent.log) and time.time() < deadline:
        time.sleep(0.05)
    assert any("disconnected mid-upload" in line for line in agent.log), agent.log
    assert RemoteRunner(agent.url, TOKEN, "onnxruntime").info()["device"] == "host"


@pytest.mark.parametrize("raw, status", [
    (b"POST /v1/run HTTP/1.1\r\nHost: x\r\nContent-Length: \xc3\xa9\r\n\r\n", b"400"),
    (b"GET /v1/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", b"4"),  # answered (401: no token), not dropped
    (b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300000 + b"\r\n\r\n", b"4"),
    (b"NONSENSE\r\n\r\n", b"400"),
])
def test_malformed_requests_get_a_4xx_answer(agent, raw, status):
    answer = agent.raw(raw)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:120]


def test_unknown_paths_and_methods_are_4xx(agent):
    assert agent.request("GET", "/v1/nothing")[0] == 404
    assert agent.request("GET", "/v1/run")[0] == 405
    assert agent.request("GET", "/v1/nothing", token=None)[0] == 401, "nothing is said without the token"


@pytest.mark.timing
def test_slow_headers_and_stalled_bodies_time_out_with_408(monkeypatch):
    monkeypatch.setattr(agent_http.GuardedH11Protocol, "header_timeout", 0.5)
    monkeypatch.setattr(agent_http, "BODY_IDLE_TIMEOUT_S", 0.5)
    server = _Server()
    try:
        start = time.time()
        answer = server.raw(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
        assert answer.startswith(b"HTTP/1.1 408") and time.time() - start < 5
        answer = server.raw(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                            f"\r\nContent-Length: 1000\r\n\r\n".encode() + b"PK")
        assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer
        assert server.request("GET", "/v1/info")[0] == 200
    finally:
        server.close()


def test_jobs_on_one_runner_run_one_at_a_time(agent, artifacts):
    body = pack(artifacts["onnx"].path, artifacts["inputs"], ["x"])
    results = []

    def job():
        status, data = agent.post("/v1/run?runner=onnxruntime&warmup=1&runs=20", body)
        results.append((status, json.loads(data)))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200, 200]
    (a, b) = sorted((r["started_at"], r["finished_at"]) for _, r in results)
    assert a[1] <= b[0], f"jobs overlapped: {a} and {b}"


@pytest.mark.timing
def test_full_queue_and_timeouts_answer_cleanly(artifacts):
    body = pack(artifacts["onnx"].path, artifacts["inputs"], ["x"])
    server = _Server(max_queue=1, job_timeout=0.05)
    try:
        status, data = server.post("/v1/run?runner=onnxruntime", body)
        assert status == 504 and b"limit" in data  # a child process cannot even start in 50 ms
    finally:
        server.close()
    server = _Server(max_queue=1, job_timeout=120)
    try:  # one job runs (a child process takes seconds to start), one waits, the rest are refused
        answers = []

        def post():
            answers.append(server.request("POST", "/v1/run?runner=onnxruntime&runs=5", body))

        # all four sent at once: the first job (a child process that takes seconds to start) cannot end before
        # the other three have arrived, as it could with requests spaced out on a fast machine
        start = threading.Barrier(4)

        def post_together():
            start.wait()
            post()

        threads = [threading.Thread(target=post_together) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        statuses = sorted(a[0] for a in answers)
        assert statuses == [200, 200, 503, 503], statuses
        refused = [a for a in answers if a[0] == 503]
        assert all(b"queue is full" in a[1] for a in refused)
        assert all(int(a[2]["retry-after"]) >= 1 for a in refused), "a 503 says when to retry"
    finally:
        server.close()


def test_unreachable_agent_is_one_clear_failure(artifacts):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SlimxFailure, match="unreachable"):
        RemoteRunner(f"http://127.0.0.1:{port}", TOKEN, "onnxruntime", timeout=5).info()


def test_token_file_must_be_private(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with pytest.raises(UsageError, match=r"can be read by other users.*chmod 600"):
        read_token(path)
    warned = []
    assert read_token(path, allow_insecure=True, warn=warned.append) == TOKEN and "chmod 600" in warned[0]
    path.chmod(0o600)
    assert read_token(path) == TOKEN


@pytest.mark.slow
@pytest.mark.timing
def test_fifty_concurrent_clients_all_get_an_answer_three_times(artifacts):
    body = pack(artifacts["onnx"].path, artifacts["inputs"], ["x"])
    server = _Server(max_queue=2, max_connections=16, job_timeout=120)
    try:
        for round_ in range(3):
            answers, errors = [], []

            def client(answers=answers, errors=errors):
                try:
                    answers.append(server.request("POST", "/v1/run?runner=onnxruntime&runs=5", body))
                except OSError as exc:  # a reset or a dropped connection: what must not happen
                    errors.append(repr(exc))

            threads = [threading.Thread(target=client) for _ in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert not errors and len(answers) == 50, (round_, errors[:3])
            assert {a[0] for a in answers} <= {200, 503}, {a[0] for a in answers}
            assert sum(a[0] == 200 for a in answers) >= 1
            assert all("retry-after" in a[2] for a in answers if a[0] == 503)
    finally:
        server.close()


def _vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


@pytest.mark.slow
@pytest.mark.timing
def test_concurrent_large_uploads_are_streamed_not_held_in_memory(tmp_path):
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "slimx.cli", "agent", "serve", "--port", str(port),
                             "--token-file", str(token), "--max-upload-mb", "64"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                RemoteRunner(url, TOKEN, "onnxruntime", timeout=2).info()
                break
            except SlimxFailure:
                time.sleep(0.2)
        before = _vm_hwm_kb(proc.pid)
        body = os.urandom(40 << 20)  # 40 MB each, incompressible; not a zip, so each is refused after streaming
        answers = []

        def upload():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/run?runner=onnxruntime", body=body,
                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Length": str(len(body))})
            answers.append(conn.getresponse().status)
            conn.close()

        threads = [threading.Thread(target=upload) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        grown_mb = (_vm_hwm_kb(proc.pid) - before) / 1024
        assert answers == [422] * 6, answers
        assert grown_mb < 60, f"six 40 MB uploads grew the agent by {grown_mb:.0f} MB: bodies are held in memory"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _big_onnx(tmp_path, features: int):
    """A real ONNX artifact of about ``4 * features**2`` bytes of random (incompressible) weights."""
    from slimx._core.inputs import InputSpec
    from slimx.export.program import Program, export_program

    seeded(0)
    model = torch.nn.Sequential(torch.nn.Linear(features, features)).eval()
    example = (torch.randn(1, features),)
    program = Program("big", export_program(model, example), model, [InputSpec("x", (1, features))], ["y"])
    return get_target("onnx").compile(program, None, CompileOptions(), tmp_path), example


def _clients(server, body: bytes, n: int, path: str = "/v1/run?runner=onnxruntime&runs=3"):
    """``n`` clients posting ``body`` at once, every other one as urllib does (``Connection: close``: the server
    closes after answering, so an unread body there is what resets a client)."""
    answers, errors = [], []

    def client(i):
        try:
            answers.append(server.request("POST", path, body, headers={"Connection": "close"} if i % 2 else None))
        except OSError as exc:  # a reset or a dropped connection: what must not happen
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return answers, errors


class _AgentProcess:
    """``slimx agent serve`` in a process of its own (as on a device: its event loop shares no GIL with the
    clients, so a socket closed with an unread body reaches them as a reset, as it does in the field)."""

    def __init__(self, tmp_path, *args):
        import subprocess
        import sys

        token = tmp_path / "token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        self.proc = subprocess.Popen([sys.executable, "-m", "slimx.cli", "agent", "serve", "--port", str(self.port),
                                      "--token-file", str(token), *args], env=env, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                RemoteRunner(self.url, TOKEN, "onnxruntime", timeout=2, wait=0).info()
                return
            except SlimxFailure:
                time.sleep(0.2)

    def request(self, method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                       "Content-Length": str(len(body)), **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data, dict(resp.getheaders())

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timing
def test_fifty_clients_sending_a_real_5mb_artifact_all_get_an_answer_three_times(tmp_path):
    artifact, example = _big_onnx(tmp_path, 1200)
    body = pack(artifact.path, example, ["x"])
    assert len(body) > 5_000_000
    server = _AgentProcess(tmp_path, "--queue", "1", "--max-connections", "8")
    try:
        for round_ in range(3):
            answers, errors = _clients(server, body, 50)
            assert not errors and len(answers) == 50, (round_, len(errors), errors[:3])
            assert {a[0] for a in answers} <= {200, 503} and any(a[0] == 503 for a in answers)
            assert sum(a[0] == 200 for a in answers) >= 1
            assert all("retry-after" in a[2] for a in answers if a[0] == 503)
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.timing
def test_clients_sending_a_90mb_artifact_to_a_busy_agent_read_its_503(tmp_path):
    artifact, example = _big_onnx(tmp_path, 5000)
    body = pack(artifact.path, example, ["x"])
    assert len(body) > 90_000_000
    server = _AgentProcess(tmp_path, "--queue", "1", "--max-connections", "2")
    try:
        answers, errors = _clients(server, body, 6)
        assert not errors and len(answers) == 6, (len(errors), errors[:3])
        assert {a[0] for a in answers} <= {200, 503} and sum(a[0] == 503 for a in answers) >= 1
    finally:
        server.close()


def test_a_refusal_before_the_body_is_read_still_reaches_a_client_sending_5mb(agent):
    body = os.urandom(5 << 20)  # over this agent's 2 MB cap too: refused on its Content-Length
    status, data, _ = agent.request("POST", "/v1/run?runner=onnxruntime", body, token="wrong")
    assert status == 401
    status, data, _ = agent.request("POST", "/v1/run?runner=onnxruntime", body)
    assert status == 413 and b"limit" in data


def test_expect_100_continue_is_answered_before_the_body_is_sent(agent):
    with socket.create_connection(("127.0.0.1", agent.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {50 << 20}\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = sock.recv(65536)  # no body sent: the agent refuses on the declared size, without a 100
    assert answer.startswith(b"HTTP/1.1 413"), answer[:120]


def test_headers_over_16_kib_are_refused_with_431(agent):
    answer = agent.raw(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:120]
    assert agent.request("GET", "/v1/info", headers={"X-Fine": "a" * 8000})[0] == 200


def test_a_disconnect_mid_upload_is_one_log_line_and_no_traceback(agent, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    before = len(agent.log)
    sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.sendall(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Length: 100000\r\n\r\n".encode() + b"PK" * 500)
    sock.close()
    deadline = time.time() + 10
    while not any("mid-upload" in line for line in agent.log[before:]) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert [line for line in agent.log[before:] if "mid-upload" in line], agent.log[before:]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


class _Hold:
    """Holds the agent's one connection slot: a request whose body trickles in."""

    def __init__(self, server):
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.sendall(f"POST /v1/run?runner=onnxruntime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                          f"\r\nContent-Length: 1000\r\n\r\nPK".encode())

    def release(self):
        self.sock.close()


def test_a_remote_client_waits_out_a_busy_agent_and_says_so(artifacts):
    server = _Server(max_connections=1, job_timeout=60)
    try:
        hold = _Hold(server)
        time.sleep(0.3)
        notes = []
        with pytest.raises(SlimxFailure, match="stayed busy"):
            RemoteRunner(server.url, TOKEN, "onnxruntime", wait=0, note=notes.append).info()
        threading.Timer(1.5, hold.release).start()
        info = RemoteRunner(server.url, TOKEN, "onnxruntime", wait=60, note=notes.append).info()
        assert info["device"] == "host"
        assert notes and "busy (503)" in notes[0] and "retrying in" in notes[0]
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.timing
def test_eight_ci_jobs_sharing_one_agent_with_queue_2_all_get_measured(artifacts):
    server = _Server(max_queue=2, job_timeout=120)
    try:
        timings, errors = [], []

        def job():
            try:
                runner = RemoteRunner(server.url, TOKEN, "onnxruntime", wait=300, note=lambda _t: None)
                timings.append(runner.time(artifacts["onnx"], artifacts["inputs"], warmup=1, runs=3))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=job) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors and len(timings) == 8, errors[:3]
        assert any("503" in line for line in server.log), "the queue was never full: the test tested nothing"
    finally:
        server.close()


def test_remote_wait_must_be_seconds():
    import slimx

    with pytest.raises(UsageError, match="remote_wait"):
        slimx.profile("x.onnx", remote="http://127.0.0.1:1", token="t", remote_wait=-1)
