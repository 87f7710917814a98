"""The device agent's HTTP front: Starlette routes served by uvicorn, with every resource bounded.

What each limit answers (the README's table lists them with their defaults):

- too many requests at once (``--max-connections``): 503 with ``Retry-After``, before anything is read;
  the listen backlog (2048) holds the connections beyond that until they are answered, none is reset;
- a runner's queue full (``--queue``): 503 with ``Retry-After``, checked before the body is read;
- no or a wrong token, or a token sent anywhere but ``Authorization: Bearer``: 401 (a token in the URL: 400,
  and the URL is never logged with its query);
- a body over ``--max-upload-mb``: 413 from its ``Content-Length`` before reading, and 413 while streaming
  when a chunked or lying body passes the cap (the body goes to a temporary file, never into memory);
- headers not complete within 10 s (slow-loris), or a body that stalls for 30 s: 408;
- a header block over 16 KiB: 431; a malformed request line or header (a non-ASCII ``Content-Length``): 400;

Every refusal sent before the body is read (401, 503, 413 from ``Content-Length``, ...) is followed by reading
and dropping the body (for ``DRAIN_S`` at most), so that the client, which sends its body whole before reading,
gets the answer rather than a reset (a socket closed with unread bytes in it is reset by the kernel). A client
that sent ``Expect: 100-continue`` is answered at once and sends no body.
- an archive that unpacks past a small multiple of its own size or past ``--max-upload-mb`` (a zip bomb),
  counted on the bytes actually written: 413; lying sizes, bad CRCs, unsafe paths, a second artifact: 422;
- a job past ``--job-timeout``: 504, its process killed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # a client must finish its request line and headers within this
BODY_IDLE_TIMEOUT_S = 30.0  # ... and never pause its body for longer than this
MAX_HEADER_BYTES = 16 * 1024
DRAIN_S = 15.0  # a refused request's body is read and dropped for this long at most, so the client reads the answer
BACKLOG = 2048
READ_CHUNK = 1 << 16


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline (uvicorn has none: a client trickling header bytes would
    hold its connection forever) and a 400 for a non-ASCII request target (uvicorn would drop the connection)."""

    header_timeout = HEADER_TIMEOUT_S
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        try:
            super().handle_events()
        except UnicodeDecodeError:
            self.send_400_response("Invalid HTTP request received (the request target is not ASCII).")
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the body has its own idle timeout

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        body = b'{"error": "the request headers did not arrive in time", "status": 408}'
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def _json(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=int(status), headers=headers)


def _wants_continue(headers: dict) -> bool:
    return headers.get(b"expect", b"").lower() == b"100-continue"


async def drain(receive, headers: dict, limit_s: float = DRAIN_S) -> None:
    """Read and drop what is left of a request body (for ``limit_s`` at most), so that the answer sent after it
    reaches the client. Not for a client waiting for ``100 Continue`` (reading would invite the body)."""
    if _wants_continue(headers):
        return
    if headers.get(b"content-length", b"0").strip() in (b"", b"0") and b"chunked" not in headers.get(
            b"transfer-encoding", b"").lower():
        return
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while (left := end - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except (TimeoutError, Exception):
            return
        if message.get("type") != "http.request" or not message.get("more_body"):
            return


def _header_bytes(scope) -> int:
    return sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


def _safe_path(scope) -> str:
    """The request path without its query (a query may carry secrets a client should not have sent)."""
    return scope.get("path", "?")[:200]


class Guard:
    """ASGI middleware in front of every route: token first (nothing is said to a client without it), then the
    connection limit; both answer before any body byte is read."""

    def __init__(self, app, agent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        agent = self.agent
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        query = scope.get("query_string", b"").lower()
        where = f"{scope.get('method', '?')} {_safe_path(scope)}"
        refuse = None
        if _header_bytes(scope) > MAX_HEADER_BYTES:
            agent.log(f"{where}: 431 {_header_bytes(scope)} bytes of headers")
            refuse = _json(431, {"error": f"the request headers are {_header_bytes(scope)} bytes, over this agent's "
                                 f"limit of {MAX_HEADER_BYTES}", "status": 431})
        elif b"token=" in query or b"access_token" in query:
            agent.log(f"{where}: 400 a token in the URL (refused; the URL is not logged)")
            refuse = _json(400, {"error": "send the token as 'Authorization: Bearer TOKEN', never in the URL",
                                 "status": 400})
        elif not agent.authorized(headers.get(b"authorization")):
            agent.log(f"{where}: 401 missing or wrong token")
            refuse = _json(401, {"error": "missing or wrong token (send 'Authorization: Bearer TOKEN')",
                                 "status": 401}, {"WWW-Authenticate": "Bearer"})
        elif agent.active >= agent.max_connections:
            agent.log(f"{where}: 503 {agent.active} requests in flight")
            refuse = _json(503, {"error": f"the agent is serving {agent.active} requests; retry shortly",
                                 "status": 503}, {"Retry-After": "2"})
        if refuse is not None:
            await drain(receive, headers)
            return await refuse(scope, receive, send)
        agent.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            agent.active -= 1


def build_app(agent):
    """The agent's ASGI application (Starlette routes behind ``Guard``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    async def info(_request):
        return _json(200, agent.info())

    async def job(request):
        return await _job(agent, request)

    async def http_error(request, exc):
        agent.log(f"{request.method} {_safe_path(request.scope)}: {exc.status_code} {exc.detail}")
        return _json(exc.status_code, {"error": str(exc.detail), "status": exc.status_code})

    routes = [Route("/v1/info", info, methods=["GET"]), Route("/v1/run", job, methods=["POST"]),
              Route("/v1/build", job, methods=["POST"])]
    return Guard(Starlette(routes=routes, exception_handlers={HTTPException: http_error}), agent)


async def _job(agent, request):
    """POST /v1/run and /v1/build: validate the query and runner, reserve a queue place, stream the body to a
    file under the cap, vet and unpack the archive, then run the job in a child process."""
    from slimx.devices.jobs import JobError

    build = request.url.path == "/v1/build"
    where = f"POST {request.url.path}"
    reserved = False
    work = None
    body = {"state": "unread"}  # unread | reading | read | stalled | gone
    try:
        params, runner = _params(request.query_params, build)
        agent.check_runner(runner, build)
        length = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        if length is None and not chunked:
            raise JobError(HTTPStatus.LENGTH_REQUIRED, "send Content-Length (or a chunked body)")
        if length is not None and int(length) > agent.max_upload:
            raise JobError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"upload of {int(length)} bytes is over this agent's limit of {agent.max_upload} bytes")
        agent.reserve(runner)  # 503 when the runner's queue is full, before a byte of the body is read
        reserved = True
        work = Path(tempfile.mkdtemp(prefix="slimx-agent-"))
        upload = work / "upload.zip"
        body["state"] = "reading"
        if not await _receive_to_file(request, upload, agent.max_upload, agent.log, body):
            body["state"] = "gone"  # the client went away: the answer below reaches no one
            return _json(400, {"error": "the client disconnected mid-upload", "status": 400})
        body["state"] = "read"
        root = agent.unpack(upload, work)
        upload.unlink()
        async with agent.locks[runner]:
            result = await agent.execute(runner, work, root, params, build)
    except JobError as exc:
        agent.log(f"{where}: {int(exc.status)} {exc}")
        if body["state"] in ("unread", "reading"):  # refused before the whole body came: drop the rest first
            await drain(request.receive, {k.lower(): v for k, v in request.scope.get("headers", [])})
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _json(exc.status, {"error": str(exc), "status": int(exc.status)}, headers)
    finally:
        if reserved:
            agent.release(runner)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    agent.log(f"{runner}: {result['timing']['median_ms']:.3f} ms median ({result['job_s']} s job)")
    return _json(200, {**result, "device": agent.device, "runner": runner})


def _params(query, build: bool) -> tuple[dict, str]:
    from slimx.devices.jobs import JobError

    try:
        params = {"warmup": int(query.get("warmup", 5)), "runs": int(query.get("runs", 50)),
                  "precision": query.get("precision", "fp16")}
    except ValueError as exc:
        raise JobError(HTTPStatus.BAD_REQUEST, f"bad query: {exc}") from None
    if not (0 <= params["warmup"] <= 1000 and 1 <= params["runs"] <= 10000):
        raise JobError(HTTPStatus.BAD_REQUEST, "bad query: warmup must be 0..1000 and runs 1..10000")
    if params["precision"] not in ("fp32", "fp16", "int8"):
        raise JobError(HTTPStatus.BAD_REQUEST, "bad query: precision must be fp32, fp16 or int8")
    return params, query.get("runner", "tensorrt" if build else "onnxruntime")


async def _receive_to_file(request, path: Path, cap: int, log, body: dict) -> bool:
    """Stream the body to ``path``; 413 as soon as it passes ``cap``, 408 when it stalls (``body["state"]`` then
    ``stalled``: nothing to drain). False: the client disconnected (logged)."""
    from starlette.requests import ClientDisconnect

    from slimx.devices.jobs import JobError

    got = 0
    stream = request.stream()
    try:
        with open(path, "wb") as fh:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), BODY_IDLE_TIMEOUT_S)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    body["state"] = "stalled"
                    raise JobError(HTTPStatus.REQUEST_TIMEOUT, f"the body stalled for {BODY_IDLE_TIMEOUT_S:g} s "
                                   f"after {got} bytes") from None
                got += len(chunk)
                if got > cap:
                    raise JobError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the body passed this agent's limit of {cap} bytes while streaming")
                fh.write(chunk)
    except ClientDisconnect:
        log(f"client disconnected mid-upload after {got} bytes")
        return False
    finally:
        await stream.aclose()
    return True


class AgentServer:
    """uvicorn serving the agent on a socket bound here (so a bad address fails at once, and port 0 works).

    ``serve_forever()`` blocks (run it in a thread for tests); ``shutdown()`` stops it from another thread.
    """

    def __init__(self, agent, host: str, port: int, backlog: int = BACKLOG) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)  # connections made before uvicorn runs wait in the backlog, not refused
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(build_app(agent), log_config=None, access_log=False, lifespan="off",
                                http=GuardedH11Protocol, backlog=backlog, timeout_keep_alive=5,
                                limit_concurrency=max(4 * agent.max_connections, 64),
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False)
        self.server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, wait_s: float = 10.0) -> None:
        self.server.should_exit = True
        deadline = time.time() + wait_s
        while not self._stopped.is_set() and time.time() < deadline and self.server.started:
            time.sleep(0.02)

    def server_close(self) -> None:
        self.socket.close()


def serve(agent, host: str, port: int, ready=None) -> AgentServer:
    """Bind the agent's server (returns it; call ``serve_forever`` or run it in a thread)."""
    server = AgentServer(agent, host, port)
    if ready is not None:
        ready(server)
    return server


def log_line(msg: str) -> None:
    print(f"slimx agent: {msg}", file=sys.stderr, flush=True)
