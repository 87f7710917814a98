"""The remote device agent: runs on the device, accepts an artifact over HTTP, times it with a local runner.

Protocol (JSON answers, ``Authorization: Bearer TOKEN`` on every request)::

    GET  /v1/info                          -> device, runners, limits, versions
    POST /v1/run?runner=R&warmup=W&runs=N  body: a zip with artifact/<file or .mlpackage folder> and inputs.npz
                                           -> {"timing": {...}, "outputs": [shapes]}
    POST /v1/build?precision=fp16|int8     body: a zip with artifact/model.onnx -> TensorRT engine built here, timed

Safety: the token is compared in constant time; uploads above the size limit are refused before the body is
read; only artifact formats are accepted (ONNX, TFLite, CoreML packages, TensorRT plans; inputs as ``.npz``
loaded with ``allow_pickle=False``), never code or pickles; archive paths and sizes are checked; each job runs in
a child process killed at the per-job timeout; each runner runs one job at a time, others wait in a bounded queue.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

READ_CHUNK = 1 << 16


def runner_suffixes() -> dict[str, tuple[str, ...]]:
    """Runner name -> the artifact suffixes it runs, from the registered targets (PyTorch eager takes no uploads)."""
    from slimx.targets import all_targets

    return {info.name: target.suffixes for target in all_targets() for info in target.runners}


class JobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_token(path: str | Path) -> str:
    from slimx._core.errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--token-file {path}", "does not exist", "write a random token into it, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token")
    token = path.read_text().strip()
    if len(token) < 16:
        raise UsageError(f"--token-file {path}", "holds a token shorter than 16 characters",
                         "use a long random token (secrets.token_urlsafe(32))")
    return token


def check_archive(data: bytes, max_unpacked: int) -> tuple[zipfile.ZipFile, str]:
    """Open an upload and vet it: safe names, bounded size, one artifact, nothing but artifact and inputs."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the upload is not a zip archive ({exc})") from exc
    total = 0
    roots = set()
    for info in infos:
        name = info.filename
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"unsafe path in the archive: {name!r}")
        total += info.file_size
        if total > max_unpacked:
            raise JobError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the archive unpacks past the size limit")
        if name == "inputs.npz" or name.endswith("/"):
            continue
        if len(parts) < 2 or parts[0] != "artifact":
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"unexpected file {name!r}: only artifact/ and inputs.npz")
        roots.add(parts[1])
    if len(roots) != 1:
        raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"the archive must hold exactly one artifact, found {len(roots)}")
    root = roots.pop()
    from slimx.targets import artifact_suffixes

    suffixes = artifact_suffixes()
    if not root.lower().endswith(suffixes):
        raise JobError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                       f"{root!r} is not an artifact format this agent runs ({', '.join(suffixes)})")
    return archive, root


def check_artifact(path: Path) -> None:
    """Refuse a file that is not what its name says (before any runtime parses it in earnest)."""
    from slimx.targets import target_for_path

    target = target_for_path(path)
    why = target.verify_file(path) if target is not None else f"{path.name} is not an artifact of a known format"
    if why:
        raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, why)


class Agent:
    """State shared by the request handlers: token, limits, one lock per runner and the queue bound."""

    def __init__(self, token: str, device: str = "host", max_upload: int = 512 << 20, job_timeout: float = 300.0,
                 max_queue: int = 8, threads: int | None = None, log=None) -> None:
        from slimx.devices.runners import runner_infos

        self.token = token
        self.device = device
        self.max_upload = max_upload
        self.job_timeout = job_timeout
        self.max_queue = max_queue
        self.threads = threads
        self.locks = {name: threading.Lock() for name in runner_infos()}
        self.waiting = dict.fromkeys(self.locks, 0)
        self.guard = threading.Lock()
        self.log = log or (lambda msg: print(f"slimx agent: {msg}", file=sys.stderr, flush=True))
        self.jobs_done = 0

    def authorized(self, header: str | None) -> bool:
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def info(self) -> dict:
        from slimx import __version__
        from slimx.devices.host import cpu_model
        from slimx.devices.runners import available_runners

        return {"device": self.device, "host": cpu_model(), "runners": available_runners(), "slimx": __version__,
                "max_upload_bytes": self.max_upload, "job_timeout_s": self.job_timeout, "max_queue": self.max_queue}

    def run_job(self, runner: str, data: bytes, params: dict, build: bool = False) -> dict:
        from slimx.devices.runners import runner_missing_reason

        formats = runner_suffixes()
        if runner not in formats or runner not in self.locks:
            raise JobError(HTTPStatus.BAD_REQUEST,
                           f"unknown runner {runner!r} (use one of {', '.join(formats)})")
        why = runner_missing_reason(runner)
        if why:
            raise JobError(HTTPStatus.NOT_IMPLEMENTED, f"runner {runner} is not available on this agent: {why}")
        archive, root = check_archive(data, self.max_upload * 4)
        want = _build_suffixes(runner) if build else formats[runner]
        if not root.lower().endswith(want):
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"runner {runner} runs {'/'.join(want)} files, not {root!r}")
        with self.guard:
            if self.waiting[runner] >= self.max_queue:
                raise JobError(HTTPStatus.SERVICE_UNAVAILABLE, f"the {runner} queue is full ({self.max_queue} jobs)")
            self.waiting[runner] += 1
        try:
            with self.locks[runner]:  # one job at a time per runner; the others wait here, in arrival order
                return self._execute(runner, archive, root, params, build)
        finally:
            with self.guard:
                self.waiting[runner] -= 1

    def _execute(self, runner: str, archive: zipfile.ZipFile, root: str, params: dict, build: bool) -> dict:
        work = Path(tempfile.mkdtemp(prefix="slimx-agent-"))
        try:
            archive.extractall(work)
            artifact = work / "artifact" / root
            check_artifact(artifact)
            job = {"runner": runner, "artifact": str(artifact), "inputs": str(work / "inputs.npz"),
                   "warmup": params.get("warmup", 5), "runs": params.get("runs", 50), "threads": self.threads,
                   "build": build, "precision": params.get("precision", "fp16")}
            (work / "job.json").write_text(json.dumps(job))
            started_at = time.time()
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-m", "slimx.devices.agent", "--job", str(work / "job.json")],
                                      capture_output=True, text=True, timeout=self.job_timeout)
            except subprocess.TimeoutExpired:
                raise JobError(HTTPStatus.GATEWAY_TIMEOUT, f"the job ran past the agent's {self.job_timeout:g} s "
                               "limit and was stopped") from None
            result_path = work / "result.json"
            if proc.returncode != 0 or not result_path.is_file():
                tail = (proc.stderr or "").strip().splitlines()
                raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                               f"the runner failed on this artifact ({tail[-1][:200] if tail else 'no message'})")
            result = json.loads(result_path.read_text())
            result["job_s"] = round(time.perf_counter() - start, 3)
            result["started_at"], result["finished_at"] = started_at, time.time()
            self.jobs_done += 1
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _build_suffixes(runner: str) -> tuple[str, ...]:
    """What a build job for ``runner``'s format is built from (TensorRT: an ONNX file)."""
    from slimx.targets import all_targets, get_target

    for target in all_targets():
        if target.runner_info(runner) is not None and target.builds_on_device_from:
            return get_target(target.builds_on_device_from).suffixes
    raise JobError(HTTPStatus.BAD_REQUEST, f"runner {runner} builds nothing on the device")


def _job_main(job_path: str) -> int:
    """The child process of one job: load inputs (no pickles), run and time, write result.json."""
    import numpy as np

    from slimx.devices.runners import get_runner
    from slimx.targets.base import Artifact

    job = json.loads(Path(job_path).read_text())
    work = Path(job_path).parent
    artifact_path = Path(job["artifact"])
    try:
        with np.load(job["inputs"], allow_pickle=False) as npz:
            names = sorted(npz.files, key=lambda n: int(n.split("_", 1)[0]) if n.split("_", 1)[0].isdigit() else 0)
            arrays = [npz[n] for n in names]
    except FileNotFoundError:
        print("the upload has no inputs.npz", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"inputs.npz is not a plain array archive ({exc})", file=sys.stderr)
        return 3
    specs = [_spec(n.split("_", 1)[-1], a) for n, a in zip(names, arrays, strict=True)]
    runner_name = job["runner"]
    build = {}
    if job["build"]:
        from slimx.targets import all_targets

        target = next(t for t in all_targets() if t.runner_info(runner_name) is not None)
        artifact_path, build = target.build_on_device(artifact_path, work, job["precision"])
    from slimx.targets import target_for_path

    artifact = Artifact(format=target_for_path(artifact_path).name, path=artifact_path, inputs=specs,
                        output_names=[])
    runner = get_runner(runner_name, threads=job.get("threads"))
    outputs = runner.run(artifact, tuple(arrays))
    timing = runner.time(artifact, tuple(arrays), warmup=int(job["warmup"]), runs=int(job["runs"]))
    result = {"timing": timing.to_dict(), "outputs": [list(np.shape(o)) for o in outputs], "build": build}
    (work / "result.json").write_text(json.dumps(result))
    return 0


def _spec(name: str, array):
    from slimx._core.inputs import InputSpec

    return InputSpec(name, tuple(array.shape), str(array.dtype))


def make_handler(agent: Agent):
    class Handler(BaseHTTPRequestHandler):
        server_version = "slimx-agent"
        protocol_version = "HTTP/1.1"
        timeout = 60  # a client that stops sending for this long is dropped

        def log_message(self, fmt, *args):  # requests are logged through agent.log, briefly
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                agent.log(f"client went away before the {status} answer")

        def _error(self, status: int, message: str) -> None:
            agent.log(f"{self.command} {self.path}: {status} {message}")
            self._answer(status, {"error": message, "status": status})

        def _authorized(self) -> bool:
            if agent.authorized(self.headers.get("Authorization")):
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
            return False

        def do_GET(self):
            if not self._authorized():
                return
            if urlparse(self.path).path == "/v1/info":
                self._answer(HTTPStatus.OK, agent.info())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")

        def do_POST(self):
            if not self._authorized():
                return
            url = urlparse(self.path)
            if url.path not in ("/v1/run", "/v1/build"):
                self._error(HTTPStatus.NOT_FOUND, f"no such endpoint {url.path}")
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._error(HTTPStatus.LENGTH_REQUIRED, "send Content-Length")
                return
            length = int(length)
            if length > agent.max_upload:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"upload of {length} bytes is over this agent's limit of {agent.max_upload} bytes")
                return
            data = self._read_body(length)
            if data is None:
                return
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                params = {"warmup": int(query.get("warmup", 5)), "runs": int(query.get("runs", 50)),
                          "precision": query.get("precision", "fp16")}
                if not (0 <= params["warmup"] <= 1000 and 1 <= params["runs"] <= 10000):
                    raise ValueError("warmup must be 0..1000 and runs 1..10000")
                runner = query.get("runner", "tensorrt" if url.path == "/v1/build" else "onnxruntime")
                result = agent.run_job(runner, data, params, build=url.path == "/v1/build")
            except ValueError as exc:
                self._error(HTTPStatus.BAD_REQUEST, f"bad query: {exc}")
                return
            except JobError as exc:
                self._error(exc.status, str(exc))
                return
            except Exception as exc:  # the agent stays up whatever one job does
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {str(exc)[:200]}")
                return
            agent.log(f"{runner}: {result['timing']['median_ms']:.3f} ms median ({result['job_s']} s job)")
            self._answer(HTTPStatus.OK, {**result, "device": agent.device, "runner": runner})

        def _read_body(self, length: int) -> bytes | None:
            chunks, got = [], 0
            try:
                while got < length:
                    chunk = self.rfile.read(min(READ_CHUNK, length - got))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except (TimeoutError, ConnectionResetError, OSError) as exc:
                agent.log(f"client disconnected mid-upload after {got} of {length} bytes ({type(exc).__name__})")
                self.close_connection = True
                return None
            if got < length:
                agent.log(f"client disconnected mid-upload after {got} of {length} bytes")
                self.close_connection = True
                return None
            return b"".join(chunks)

    return Handler


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a dropped client is logged in one line, not a trace
        exc = sys.exc_info()[1]
        print(f"slimx agent: connection from {client_address[0]} ended: {type(exc).__name__}", file=sys.stderr)


def serve(agent: Agent, host: str, port: int, ready=None) -> AgentServer:
    """Start the server (returns it; call ``serve_forever`` or run it in a thread)."""
    server = AgentServer((host, port), make_handler(agent))
    if ready is not None:
        ready(server)
    return server


# --- the client --------------------------------------------------------------------------------------------

def pack(artifact_path: Path, inputs: tuple, input_names: list[str]) -> bytes:
    """Zip an artifact (file or .mlpackage folder) and its inputs (``.npz``, no pickles) for the agent."""
    import numpy as np

    from slimx.targets.base import to_numpy_inputs

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        artifact_path = Path(artifact_path)
        if artifact_path.is_dir():
            for f in sorted(artifact_path.rglob("*")):
                if f.is_file():
                    zf.write(f, f"artifact/{artifact_path.name}/{f.relative_to(artifact_path).as_posix()}")
        else:
            zf.write(artifact_path, f"artifact/{artifact_path.name}")
        arrays = io.BytesIO()
        np.savez(arrays, **{f"{i}_{name}": a for i, (name, a) in
                            enumerate(zip(input_names, to_numpy_inputs(inputs), strict=True))})
        zf.writestr("inputs.npz", arrays.getvalue())
    return buf.getvalue()


class RemoteRunner:
    """Client of a slimx agent; the same ``time``/``run`` protocol as a local runner."""

    name = "remote"

    def __init__(self, url: str, token: str, runner: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.runner = runner
        self.timeout = timeout
        self.last: dict = {}

    def _request(self, method: str, path: str, data: bytes | None = None) -> dict:
        import urllib.error
        import urllib.request

        from slimx._core.errors import SlimxFailure, UsageError

        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/zip"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, OSError):
                message = str(exc.reason)
            if exc.code == 401:
                raise UsageError(f"agent {self.url}", "refused the token (401)",
                                 "pass the agent's token with --token-file") from None
            if exc.code in (400, 411, 413, 415, 422):
                raise UsageError(f"agent {self.url}", f"refused the job ({exc.code}: {message})",
                                 "check the artifact and its size against the agent's limits") from None
            raise SlimxFailure(f"agent {self.url}", f"job failed ({exc.code}: {message})",
                               "see the agent's log; retry when its queue has room") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SlimxFailure(f"agent {self.url}", f"unreachable ({reason})",
                               "start it on the device with `slimx agent serve` and check --remote") from None

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def time(self, artifact, inputs: tuple, warmup: int = 5, runs: int = 50, build: bool = False,
             precision: str = "fp16"):
        from slimx.targets.base import Timing

        names = [s.name for s in artifact.inputs]
        body = pack(artifact.path, inputs, names)
        if build:
            path = f"/v1/build?precision={precision}&warmup={warmup}&runs={runs}"
        else:
            path = f"/v1/run?runner={self.runner}&warmup={warmup}&runs={runs}"
        self.last = self._request("POST", path, body)
        return Timing(**self.last["timing"])

    def run(self, artifact, inputs: tuple):
        from slimx._core.errors import UsageError

        raise UsageError("the remote runner", "returns timings, not outputs", "check parity with slimx export")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--job":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        sys.exit(_job_main(sys.argv[2]))
    print("usage: slimx agent serve --host H --port P --token-file F", file=sys.stderr)
    sys.exit(2)
