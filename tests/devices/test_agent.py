"""The remote device agent on loopback: real onnxruntime and LiteRT runners behind a real HTTP server."""

from __future__ import annotations

import http.client
import io
import socket
import threading
import time
import zipfile

import pytest

from slimx._core.errors import SlimxFailure, UsageError
from slimx._core.inputs import sample_inputs
from slimx.devices.agent import Agent, RemoteRunner, pack, serve
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
    for fmt in ("onnx", "tflite"):
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

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def post(self, path: str, body: bytes, token: str | None = TOKEN, length: int | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Length": str(len(body) if length is None else length)}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data


@pytest.fixture(scope="module")
def agent():
    server = _Server(max_upload=2 << 20, job_timeout=120)
    yield server
    server.close()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_info_needs_the_token(agent):
    runner = RemoteRunner(agent.url, TOKEN, "onnxruntime")
    info = runner.info()
    assert "onnxruntime" in info["runners"] and info["max_upload_bytes"] == 2 << 20
    with pytest.raises(UsageError, match="refused the token"):
        RemoteRunner(agent.url, "wrong-token-wrong-token", "onnxruntime").info()
    status, _ = agent.post("/v1/run", b"x", token=None)
    assert status == 401


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


def test_oversized_upload_is_refused_before_reading(agent):
    status, data = agent.post("/v1/run?runner=onnxruntime", b"0" * 16, length=3 << 20)
    assert status == 413 and b"over this agent's limit" in data


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


def test_jobs_on_one_runner_run_one_at_a_time(agent, artifacts):
    body = pack(artifacts["onnx"].path, artifacts["inputs"], ["x"])
    results = []

    def job():
        import json

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


def test_full_queue_and_timeouts_answer_cleanly(artifacts):
    server = _Server(max_queue=1, job_timeout=0.05)
    try:
        body = pack(artifacts["onnx"].path, artifacts["inputs"], ["x"])
        status, data = server.post("/v1/run?runner=onnxruntime", body)
        assert status == 504 and b"limit" in data  # a child process cannot even start in 50 ms
        server.agent.locks["onnxruntime"].acquire()  # a job is running: the next one waits, the one after is refused
        waiting = threading.Thread(target=server.post, args=("/v1/run?runner=onnxruntime", body))
        waiting.start()
        deadline = time.time() + 10
        while server.agent.waiting["onnxruntime"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        status, data = server.post("/v1/run?runner=onnxruntime", body)
        assert status == 503 and b"queue is full" in data
        server.agent.locks["onnxruntime"].release()
        waiting.join(timeout=30)
    finally:
        server.close()


def test_unreachable_agent_is_one_clear_failure(artifacts):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SlimxFailure, match="unreachable"):
        RemoteRunner(f"http://127.0.0.1:{port}", TOKEN, "onnxruntime", timeout=5).info()
