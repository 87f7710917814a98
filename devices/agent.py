"""The remote device agent: runs on the device, accepts an artifact over HTTP, times it with a local runner.

Protocol (JSON answers, ``Authorization: Bearer TOKEN`` on every request)::

    GET  /v1/info                          -> device, runners, limits, versions
    POST /v1/run?runner=R&warmup=W&runs=N  body: a zip with artifact/<file or .mlpackage folder> and inputs.npz
                                           -> {"timing": {...}, "outputs": [shapes]}
    POST /v1/build?precision=fp16|int8     body: a zip with artifact/model.onnx -> TensorRT engine built here, timed

Safety: the token is taken only as ``Authorization: Bearer`` and compared in constant time; the server
(uvicorn with Starlette, ``devices.agent_http``) bounds connections, header and body time, and upload size while
streaming to disk; only artifact formats are accepted (ONNX, TFLite, CoreML packages, TensorRT plans; inputs as
``.npz`` loaded with ``allow_pickle=False``), never code or pickles; archive paths are checked, and sizes on the
bytes actually unpacked; each job runs in a child process killed at the per-job timeout; each runner runs one job
at a time, others wait in a bounded queue.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import sys
import time
import zipfile
import zlib
from http import HTTPStatus
from pathlib import Path

from slimx.devices.jobs import JobError

READ_CHUNK = 1 << 16


def runner_suffixes() -> dict[str, tuple[str, ...]]:
    """Runner name -> the artifact suffixes it runs, from the registered targets (PyTorch eager takes no uploads)."""
    from slimx.targets import all_targets

    return {info.name: target.suffixes for target in all_targets() for info in target.runners}


def read_token(path: str | Path, allow_insecure: bool = False, warn=None) -> str:
    """The shared token from ``path``: 16+ characters, in a file only its owner can read (ssh's rule for keys);
    ``allow_insecure`` accepts a group- or world-readable file with a warning."""
    import stat

    from slimx._core.errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--token-file {path}", "does not exist", "write a random token into it, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token; chmod 600 token")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        if not allow_insecure:
            raise UsageError(f"--token-file {path}", f"can be read by other users (mode {stat.filemode(mode)})",
                             f"chmod 600 {path}, or pass --allow-insecure-token-file")
        (warn or (lambda m: print(f"slimx: warning: {m}", file=sys.stderr)))(
            f"--token-file {path} can be read by other users (mode {stat.filemode(mode)}); chmod 600 it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise UsageError(f"--token-file {path}", "holds a token shorter than 16 characters",
                         "use a long random token (secrets.token_urlsafe(32))")
    return token


UNPACK_RATIO = 20  # an archive may unpack to at most this many times its own size (artifacts barely compress)


def unpack_limit(archive_bytes: int, max_unpacked: int) -> int:
    """The most an archive of ``archive_bytes`` may unpack to: a small multiple of its size (weights compress
    little; a zip bomb compresses by 1000x), never more than ``max_unpacked``."""
    return min(max_unpacked, max(1 << 20, UNPACK_RATIO * archive_bytes))


def check_archive(source, max_unpacked: int) -> tuple[zipfile.ZipFile, str]:
    """Open an upload (a path or bytes) and vet its directory: safe names, declared sizes under
    ``max_unpacked``, one artifact, nothing but artifact and inputs. The sizes are checked again on the bytes
    actually written (``extract``): a header may lie."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"the upload is not a zip archive ({exc})") from exc
    total = 0
    roots = set()
    for info in infos:
        name = info.filename
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\\" in name:
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"unsafe path in the archive: {name!r}")
        total += info.file_size
        if total > max_unpacked:
            raise JobError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the archive declares more than {max_unpacked} unpacked bytes (the limit for its size)")
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


def extract(archive: zipfile.ZipFile, dest: Path, max_unpacked: int) -> int:
    """Unpack every member under ``dest``, counting the bytes actually written (413 past ``max_unpacked``); a
    member whose data do not match its header (size, CRC) is a 422. Returns the bytes written."""
    written = 0
    dest = Path(dest).resolve()
    for info in archive.infolist():
        target = (dest / info.filename).resolve()
        if dest not in target.parents:
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"unsafe path in the archive: {info.filename!r}")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(READ_CHUNK):
                    written += len(chunk)
                    if written > max_unpacked:
                        raise JobError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                       f"the archive unpacked past {max_unpacked} bytes (the limit for its size)")
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"the archive is corrupt at {info.filename!r} ({exc})") from None
    return written


def check_artifact(path: Path) -> None:
    """Refuse a file that is not what its name says (before any runtime parses it in earnest)."""
    from slimx.targets import target_for_path

    target = target_for_path(path)
    why = target.verify_file(path) if target is not None else f"{path.name} is not an artifact of a known format"
    if why:
        raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, why)


class Agent:
    """State shared by the request handlers (all on the server's event loop): token, limits, one lock and a
    waiting count per runner, the requests in flight.

    Attributes:
        max_upload: bytes an upload (and what it unpacks to) may have.
        max_queue: jobs that may wait per runner while one runs (503 with Retry-After beyond).
        max_connections: requests served at once (503 with Retry-After beyond).
    """

    def __init__(self, token: str, device: str = "host", max_upload: int = 512 << 20, job_timeout: float = 300.0,
                 max_queue: int = 8, threads: int | None = None, log=None, max_connections: int = 64) -> None:
        import asyncio

        from slimx.devices.runners import runner_infos

        self.token = token
        self.device = device
        self.max_upload = max_upload
        self.job_timeout = job_timeout
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.threads = threads
        self.locks = {name: asyncio.Lock() for name in runner_infos()}
        self.admitted = dict.fromkeys(self.locks, 0)  # per runner: jobs receiving, waiting or running
        self.active = 0
        self.log = log or (lambda msg: print(f"slimx agent: {msg}", file=sys.stderr, flush=True))
        self.jobs_done = 0
        self.job_seconds: list[float] = []

    def authorized(self, header: str | bytes | None) -> bool:
        """Only ``Authorization: Bearer TOKEN`` (the scheme in any case), compared in constant time."""
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.token.encode())

    def info(self) -> dict:
        from slimx import __version__
        from slimx.devices.host import cpu_model
        from slimx.devices.runners import available_runners

        return {"device": self.device, "host": cpu_model(), "runners": available_runners(), "slimx": __version__,
                "max_upload_bytes": self.max_upload, "job_timeout_s": self.job_timeout, "max_queue": self.max_queue,
                "max_connections": self.max_connections, "unpack_ratio": UNPACK_RATIO}

    def check_runner(self, runner: str, build: bool) -> None:
        """400 for an unknown runner, 501 for one this device cannot run."""
        from slimx.devices.runners import runner_missing_reason

        formats = runner_suffixes()
        if runner not in formats or runner not in self.locks:
            raise JobError(HTTPStatus.BAD_REQUEST, f"unknown runner {runner!r} (use one of {', '.join(formats)})")
        why = runner_missing_reason(runner)
        if why:
            raise JobError(HTTPStatus.NOT_IMPLEMENTED, f"runner {runner} is not available on this agent: {why}")
        if build:
            _build_suffixes(runner)

    def retry_after(self, runner: str) -> int:
        """Seconds until a place is likely free: the recent mean job time times the jobs ahead."""
        mean = sum(self.job_seconds[-10:]) / len(self.job_seconds[-10:]) if self.job_seconds else 5.0
        return max(1, round(mean * max(1, self.admitted.get(runner, 0))))

    def reserve(self, runner: str) -> None:
        """Admit one job (503 when one runs and ``max_queue`` more are already admitted: receiving, unpacking or
        waiting); a job counts from here until it ends, so simultaneous uploads cannot all slip in."""
        if self.admitted[runner] > self.max_queue:
            raise JobError(HTTPStatus.SERVICE_UNAVAILABLE, f"the {runner} queue is full (one job running and "
                           f"{self.max_queue} waiting)", retry_after=self.retry_after(runner))
        self.admitted[runner] += 1

    def release(self, runner: str) -> None:
        self.admitted[runner] -= 1

    def unpack(self, upload: Path, work: Path) -> str:
        """Vet the uploaded archive and unpack it under ``work`` within its limit; returns the artifact's name."""
        limit = unpack_limit(upload.stat().st_size, self.max_upload)
        archive, root = check_archive(upload, limit)
        with archive:
            extract(archive, work, limit)
        check_artifact(work / "artifact" / root)
        return root

    async def execute(self, runner: str, work: Path, root: str, params: dict, build: bool) -> dict:
        """Run one unpacked job in a child process (killed at ``job_timeout``); returns its result."""
        import asyncio

        if build:
            want = _build_suffixes(runner)
            if not root.lower().endswith(want):
                raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY, f"runner {runner} builds from {'/'.join(want)} "
                               f"files, not {root!r}")
        elif not root.lower().endswith(runner_suffixes()[runner]):
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"runner {runner} runs {'/'.join(runner_suffixes()[runner])} files, not {root!r}")
        job = {"runner": runner, "artifact": str(work / "artifact" / root), "inputs": str(work / "inputs.npz"),
               "warmup": params.get("warmup", 5), "runs": params.get("runs", 50), "threads": self.threads,
               "build": build, "precision": params.get("precision", "fp16")}
        (work / "job.json").write_text(json.dumps(job))
        started_at = time.time()
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "slimx.devices.agent", "--job",
                                                    str(work / "job.json"), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self.job_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise JobError(HTTPStatus.GATEWAY_TIMEOUT, f"the job ran past the agent's {self.job_timeout:g} s limit "
                           "and was stopped") from None
        result_path = work / "result.json"
        if proc.returncode != 0 or not result_path.is_file():
            tail = stderr.decode("utf-8", "replace").strip().splitlines()
            raise JobError(HTTPStatus.UNPROCESSABLE_ENTITY,
                           f"the runner failed on this artifact ({tail[-1][:200] if tail else 'no message'})")
        result = json.loads(result_path.read_text())
        result["job_s"] = round(time.perf_counter() - start, 3)
        result["started_at"], result["finished_at"] = started_at, time.time()
        self.jobs_done += 1
        self.job_seconds.append(result["job_s"])
        return result


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


def serve(agent: Agent, host: str, port: int, ready=None):
    """Bind the agent's HTTP server (uvicorn, ``devices.agent_http``); call ``serve_forever`` on what it returns."""
    from slimx.devices.agent_http import serve as serve_http

    return serve_http(agent, host, port, ready)


# --- the client --------------------------------------------------------------------------------------------

def pack_into(fh, artifact_path: Path, inputs: tuple, input_names: list[str]) -> None:
    """Zip an artifact (file or .mlpackage folder) and its inputs (``.npz``, no pickles) into the open binary
    file ``fh``, for the agent."""
    import numpy as np

    from slimx.targets.base import to_numpy_inputs

    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
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


def pack(artifact_path: Path, inputs: tuple, input_names: list[str]) -> bytes:
    """``pack_into`` an in-memory buffer: the upload's bytes."""
    buf = io.BytesIO()
    pack_into(buf, artifact_path, inputs, input_names)
    return buf.getvalue()


def _retry_after(exc) -> float:
    """The seconds a 503's ``Retry-After`` asks for (a number; an HTTP date or nothing: 2)."""
    try:
        return max(0.0, float(exc.headers.get("Retry-After", "2")))
    except (TypeError, ValueError):
        return 2.0


class RemoteRunner:
    """Client of a slimx agent; the same ``time``/``run`` protocol as a local runner.

    A busy agent (503: its queue or its connections full, as when CI jobs share one device) is waited out: the
    request is sent again after the ``Retry-After`` it gives (with jitter, so that waiting jobs do not return
    together) until ``wait`` seconds have passed since the first try, each wait announced through ``note``.
    The upload is packed into a temporary file and streamed from it, not built in memory.
    """

    name = "remote"

    def __init__(self, url: str, token: str, runner: str, timeout: float = 600.0, wait: float = 900.0,
                 note=None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.runner = runner
        self.timeout = timeout
        self.wait = wait
        self.note = note or (lambda text: print(f"slimx: {text}", file=sys.stderr, flush=True))
        self.last: dict = {}

    def _request(self, method: str, path: str, body=None) -> dict:
        """Send the request (``body``: an open binary file, sent from its start each try), waiting out 503s."""
        import random
        import urllib.error

        from slimx._core.errors import SlimxFailure

        started, tries = time.monotonic(), 0
        while True:
            tries += 1
            try:
                return self._send(method, path, body)
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    self._refused(exc)
                pause = _retry_after(exc) * (1 + random.random() / 2)
                left = self.wait - (time.monotonic() - started)
                if pause > left:
                    raise SlimxFailure(f"agent {self.url}", f"stayed busy (503) for {time.monotonic() - started:.0f} "
                                       f"s over {tries} tries", "raise --remote-wait, or give the agent a longer "
                                       "--queue") from None
                self.note(f"agent {self.url} is busy (503): retrying in {pause:.1f} s (try {tries}, "
                          f"{left:.0f} s left of --remote-wait {self.wait:g})")
                time.sleep(pause)

    def _send(self, method: str, path: str, body):
        import urllib.error
        import urllib.request

        from slimx._core.errors import SlimxFailure

        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/zip"}
        if body is not None:
            body.seek(0, os.SEEK_END)
            headers["Content-Length"] = str(body.tell())
            body.seek(0)
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SlimxFailure(f"agent {self.url}", f"unreachable ({reason})",
                               "start it on the device with `slimx agent serve` and check --remote") from None

    def _refused(self, exc) -> None:
        from slimx._core.errors import SlimxFailure, UsageError

        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, OSError):
            message = str(exc.reason)
        if exc.code == 401:
            raise UsageError(f"agent {self.url}", "refused the token (401)",
                             "pass the agent's token with --token-file") from None
        if exc.code in (400, 411, 413, 415, 422, 431):
            raise UsageError(f"agent {self.url}", f"refused the job ({exc.code}: {message})",
                             "check the artifact and its size against the agent's limits") from None
        raise SlimxFailure(f"agent {self.url}", f"job failed ({exc.code}: {message})",
                           "see the agent's log; retry when its queue has room") from None

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def time(self, artifact, inputs: tuple, warmup: int = 5, runs: int = 50, build: bool = False,
             precision: str = "fp16"):
        import tempfile

        from slimx.targets.base import Timing

        names = [s.name for s in artifact.inputs]
        if build:
            path = f"/v1/build?precision={precision}&warmup={warmup}&runs={runs}"
        else:
            path = f"/v1/run?runner={self.runner}&warmup={warmup}&runs={runs}"
        with tempfile.TemporaryFile(prefix="slimx-upload-") as body:
            pack_into(body, artifact.path, inputs, names)
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
