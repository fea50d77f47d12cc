"""A tiny asyncio HTTP/1.1 server (httptools parser) for the admin, metrics and readiness listeners.

One ``HttpServer`` per listener, each a route table ``(method, path) → async handler(Request) ->
Response``. ``AdminServer`` builds the three listeners of DESIGN §2 from callables the proxy wires in:

* admin, 127.0.0.1:15000 only (Envoy and ztunnel bind admin to localhost: it can stop the proxy):
  ``GET /`` index, ``GET /config_dump``, ``POST /quitquitquit``, ``POST /logging[?level=...]``,
  ``POST /explain``, ``GET /ready``;
* metrics, :15020: ``GET /metrics`` and ``GET /stats/prometheus`` (pilot-agent serves both);
* readiness, :15021: ``GET /healthz/ready`` → 200 ``ready\\n`` or 503 ``not ready: <reason>\\n``.

State-changing endpoints answer GET with 405 (Envoy: "This endpoint requires POST", so a browser or a
link prefetcher cannot stop the proxy). Malformed requests get 400 and only that connection closes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import parse_qs, unquote

import httptools
import re2

log = logging.getLogger("hbone.admin")

# Largest request (request line + headers + body) we accept: admin requests are a URL or a small
# JSON body (explain); 64 KiB leaves room for long header lists and bounds memory per connection.
MAX_REQUEST_BYTES = 64 * 1024
# A request must arrive completely within this many seconds once it starts (slowloris guard).
REQUEST_TIMEOUT_S = 10.0
# A keep-alive connection with no request for this long is closed (Prometheus scrapes every 15 s by
# default and reconnects cheaply; 60 s keeps its connection across scrapes without hoarding fds).
IDLE_TIMEOUT_S = 60.0
# A handler (config dump, explain) taking longer than this answers 504 instead of hanging the client.
HANDLER_TIMEOUT_S = 30.0
# Concurrent connections per listener; more are answered 503 and closed. Operators and scrapers
# need a handful; the cap keeps a misbehaving client from exhausting file descriptors.
MAX_CONNECTIONS = 64
# Requests served on one keep-alive connection before we close it (bounds a single client's share).
MAX_REQUESTS_PER_CONNECTION = 1000
READ_CHUNK_BYTES = 16 * 1024

ADMIN_ADDR = "127.0.0.1:15000"
METRICS_ADDR = "0.0.0.0:15020"      # pilot-agent listens on all addresses so Prometheus can scrape it
READINESS_ADDR = "0.0.0.0:15021"    # ditto for the kubelet's readiness probe

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class Request:
    method: str
    path: str                                  # percent-decoded path, no query
    query: Mapping[str, list[str]]
    headers: tuple[tuple[str, str], ...]        # lower-cased names, in order
    body: bytes = b""
    http_version: str = "1.1"
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str = TEXT
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> "Response":
        return cls(status, TEXT, text.encode(), headers)

    @classmethod
    def json(cls, status: int, obj: Any) -> "Response":
        return cls(status, JSON, (json.dumps(obj, indent=2) + "\n").encode())


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    """The bytes on a connection are not an HTTP/1.1 request we accept; carries its answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def encode_response(resp: Response, *, keep_alive: bool, head: bool = False) -> bytes:
    try:
        phrase = HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {resp.status} {phrase}", f"Content-Type: {resp.content_type}",
             f"Content-Length: {len(resp.body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else resp.body)


class RequestParser:
    """Bytes in, ``Request``s out (httptools underneath). Raises ``BadRequest`` only."""

    def __init__(self, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self._p = httptools.HttpRequestParser(self)
        self._max = max_bytes
        self._size = 0                 # bytes of the request in progress
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._in_message = False
        self.done: list[Request] = []

    @property
    def in_message(self) -> bool:
        return self._in_message

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._size = 0
        self._url.clear()
        self._headers = []
        self._body.clear()

    def _count(self, n: int) -> None:
        # Counted inside the callbacks so that a request completed by the same chunk that makes it
        # too large is still refused (a check after feed_data would see a finished message).
        self._size += n
        if self._size > self._max:
            raise BadRequest(413, f"request larger than {self._max} bytes")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)   # + ": " and CRLF
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._count(len(body))
        self._body += body

    def on_message_complete(self) -> None:
        try:
            url = httptools.parse_url(bytes(self._url))
        except httptools.HttpParserInvalidURLError as err:
            raise BadRequest(400, f"bad request target: {err}") from None
        path = unquote((url.path or b"/").decode("latin-1"))
        query = parse_qs(url.query.decode("latin-1"), keep_blank_values=True) if url.query else {}
        self.done.append(Request(
            method=self._p.get_method().decode("latin-1"), path=path, query=query,
            headers=tuple(self._headers), body=bytes(self._body),
            http_version=self._p.get_http_version(), keep_alive=self._p.should_keep_alive()))
        self._in_message = False

    def feed(self, data: bytes) -> list[Request]:
        """Feed bytes; return the requests completed by them (in order)."""
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise BadRequest(400, "upgrade and CONNECT are not supported here") from None
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__ or err.__cause__
            if isinstance(cause, BadRequest):
                raise cause from None
            raise BadRequest(400, f"malformed request: {err}") from None
        except httptools.HttpParserError as err:
            raise BadRequest(400, f"malformed request: {err}") from None
        done, self.done = self.done, []
        return done


class HttpServer:
    """One listener: a route table served over HTTP/1.1 with keep-alive."""

    def __init__(self, name: str, routes: Mapping[tuple[str, str], Handler], host: str, port: int) -> None:
        self.name = name
        self.routes = dict(routes)
        self._paths: dict[str, list[str]] = {}
        for method, path in self.routes:
            self._paths.setdefault(path, []).append(method)
        self.host, self.port = host, port
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self.served = 0
        self.rejected = 0

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when constructed with port 0."""
        if self._server is None:
            return self.host, self.port
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Close the transports rather than cancel the tasks: a blocked read then returns EOF and
            # each connection task ends normally (asyncio logs an error for a cancelled one).
            for w in list(self._conns.values()):
                w.transport.abort()
            if self._conns:
                await asyncio.wait(list(self._conns), timeout=REQUEST_TIMEOUT_S)
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_CONNECTIONS:
            self.rejected += 1
            writer.write(encode_response(Response.text(503, "too many connections\n"), keep_alive=False))
            await _close(writer)
            return
        self._conns[task] = writer
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(task, None)
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestParser()
        pending: list[Request] = []
        served = 0
        while True:
            if not pending:
                timeout = REQUEST_TIMEOUT_S if parser.in_message else IDLE_TIMEOUT_S
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    if parser.in_message:
                        writer.write(encode_response(Response.text(408, "request timeout\n"), keep_alive=False))
                    return
                if not data:
                    return
                try:
                    pending = parser.feed(data)
                except BadRequest as err:
                    writer.write(encode_response(Response.text(err.status, f"{err}\n"), keep_alive=False))
                    await writer.drain()
                    await _lingering_close(reader, writer)
                    return
                continue
            req = pending.pop(0)
            served += 1
            keep_alive = req.keep_alive and served < MAX_REQUESTS_PER_CONNECTION
            resp = await self.dispatch(req)
            writer.write(encode_response(resp, keep_alive=keep_alive, head=req.method == "HEAD"))
            await writer.drain()
            if not keep_alive:
                return

    async def dispatch(self, req: Request) -> Response:
        """Route one request; every failure becomes a response, never an exception."""
        self.served += 1
        method = "GET" if req.method == "HEAD" else req.method
        handler = self.routes.get((method, req.path))
        if handler is None:
            allowed = self._paths.get(req.path)
            if allowed is None:
                return Response.text(404, f"not found: {req.path}\n{self.index_text()}")
            allow = ", ".join(sorted(allowed))
            return Response.text(405, f"method not allowed: {req.path} requires {allow}\n", (("Allow", allow),))
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT_S):
                return await handler(req)
        except TimeoutError:
            return Response.text(504, f"{req.path} took longer than {HANDLER_TIMEOUT_S:g}s\n")
        except BadRequest as err:
            return Response.text(err.status, f"{err}\n")
        except Exception as err:   # a handler bug answers 500; the listener keeps serving
            log.exception("admin handler %s %s failed", req.method, req.path)
            return Response.text(500, f"internal error: {type(err).__name__}: {err}\n")

    def index_text(self) -> str:
        lines = [f"{self.name} endpoints:"]
        for (method, path), handler in sorted(self.routes.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            doc = (handler.__doc__ or "").strip().splitlines()
            lines.append(f"  {method:<5} {path:<20} {doc[0] if doc else ''}".rstrip())
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        state = "listening" if self._server is not None else "stopped"
        host, port = self.address
        return f"<HttpServer {self.name} {host}:{port} {state} conns={len(self._conns)} served={self.served}>"


# After an error answer, read and discard what the client is still sending for up to this long /
# this much before closing: closing with unread input makes the kernel send RST, which can destroy
# our answer before the client reads it (nginx's lingering_close, for the same reason).
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024


async def _lingering_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        if writer.can_write_eof():
            writer.write_eof()
        seen = 0
        async with asyncio.timeout(LINGER_S):
            while seen < LINGER_BYTES:
                chunk = await reader.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                seen += len(chunk)
    except (TimeoutError, ConnectionError, OSError):
        pass


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


def parse_addr(addr: str | tuple[str, int], default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:15000"``, ``"[::1]:15000"``, ``":15000"`` (all addresses) or a (host, port) tuple."""
    if isinstance(addr, tuple):
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"address {addr!r} needs a port (HOST:PORT)")
        host, port = addr, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in address {addr!r}")
    return host, int(port)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# ---------------------------------------------------------------------------------------------
# /logging

PY_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
             "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
             "off": logging.CRITICAL + 10}
ACCESS_LOGGER = "access"   # ztunnel's tracing target for access logs; ``?level=access:error``


class LoggingControl:
    """Envoy/ztunnel ``POST /logging`` semantics: no ``level`` lists the levels; ``level=debug`` sets
    all; ``level=mod:lvl,mod2:lvl`` sets named loggers. ``access`` is the access log's level."""

    def __init__(self, access_log: Any | None = None, root: str = "") -> None:
        self.access_log = access_log
        self.root = root
        self._touched: set[str] = set()

    def __call__(self, spec: str | None) -> str:
        if spec:
            changes: list[tuple[str, str]] = []
            for part in spec.split(","):
                name, _, level = part.rpartition(":")
                level = level.strip().lower()
                if level not in PY_LEVELS:
                    raise ValueError(f"unknown level {level!r}; use one of {', '.join(PY_LEVELS)}")
                changes.append((name.strip(), level))
            for name, level in changes:   # validate all first, then apply: no half-applied spec
                if name == ACCESS_LOGGER:
                    if self.access_log is not None:
                        self.access_log.set_level("off" if level == "critical" else level.replace("trace", "debug"))
                    continue
                logging.getLogger(name or self.root or None).setLevel(PY_LEVELS[level])
                if name:
                    self._touched.add(name)
        return self.describe()

    def describe(self) -> str:
        root = logging.getLogger(self.root or None)
        lines = ["active loggers:", f"  {self.root or 'root'}: {logging.getLevelName(root.getEffectiveLevel()).lower()}"]
        for name in sorted(self._touched):
            lines.append(f"  {name}: {logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()}")
        if self.access_log is not None:
            lines.append(f"  {ACCESS_LOGGER}: {self.access_log.level}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The three listeners


# /stats?filter=: RE2 as Envoy's admin, quiet (a bad filter is the caller's 400, not a log line), no groups.
_STATS_FILTER_OPTIONS = re2.Options()
_STATS_FILTER_OPTIONS.log_errors = False
_STATS_FILTER_OPTIONS.never_capture = True


@dataclass
class AdminServer:
    """Admin, metrics and readiness listeners, wired to the proxy by callables (sync or async):

    * ``config_dump() -> dict``: the JSON for ``/config_dump`` (see ``proxy.admin.views``);
    * ``quit() -> None``: start a graceful shutdown (``/quitquitquit``);
    * ``logging(spec: str | None) -> str``: ``/logging``; raise ``ValueError`` for a bad spec (400);
    * ``readiness() -> str | None``: ``None`` when ready, else the reason it is not;
    * ``metrics() -> bytes``: Prometheus text exposition (e.g. ``Metrics.exposition``);
    * ``explain(request: dict) -> dict``: ``/explain`` (schema in ``proxy.admin.explain``);
    * ``stats() -> list[tuple[str, int]]``: ``/stats``, Envoy admin's text form (``name: value`` lines);
    * ``worker_metrics``: a ``proxy.admin.workers.WorkerMetrics`` when this is worker 0 of several:
      ``/metrics`` then answers the sum over the workers and ``?worker=K`` one worker's.

    An address of ``None`` leaves that listener off; port 0 picks a free port (see ``addresses``).
    """

    config_dump: Callable[[], Any]
    quit: Callable[[], Any] | None = None
    logging: Callable[[str | None], Any] = field(default_factory=LoggingControl)
    readiness: Callable[[], Any] = lambda: None
    metrics: Callable[[], Any] | None = None
    explain: Callable[[dict], Any] | None = None
    stats: Callable[[], Any] | None = None
    # --workers N (worker 0): /metrics sums every worker's; ?worker=K gives one (proxy/admin/workers.py).
    worker_metrics: Any = None
    admin_addr: str | tuple[str, int] | None = ADMIN_ADDR
    metrics_addr: str | tuple[str, int] | None = METRICS_ADDR
    readiness_addr: str | tuple[str, int] | None = READINESS_ADDR
    servers: dict[str, HttpServer] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        from proxy.telemetry.metrics import CONTENT_TYPE
        self._metrics_ct = CONTENT_TYPE
        listeners = (("admin", self.admin_addr, self._admin_routes()),
                     ("metrics", self.metrics_addr, self._metrics_routes()),
                     ("readiness", self.readiness_addr, self._readiness_routes()))
        for name, addr, routes in listeners:
            if addr is not None:
                host, port = parse_addr(addr)
                self.servers[name] = HttpServer(name, routes, host, port)

    # ---- route tables ----
    def _admin_routes(self) -> dict[tuple[str, str], Handler]:
        async def index(req: Request) -> Response:
            """this list"""
            return Response.text(200, self.servers["admin"].index_text())

        async def config_dump(req: Request) -> Response:
            """proxy state as JSON; ?resource=KEY for one part"""
            dump = await _maybe_await(self.config_dump())
            resource = req.arg("resource")
            if resource:
                if resource not in dump:
                    return Response.text(404, f"no resource {resource!r}; have: {', '.join(dump)}\n")
                dump = {resource: dump[resource]}
            return Response.json(200, dump)

        async def quitquitquit(req: Request) -> Response:
            """drain and exit"""
            if self.quit is None:
                return Response.text(501, "quit is not wired in this process\n")
            await _maybe_await(self.quit())
            return Response.text(200, "OK\n")

        async def logging_(req: Request) -> Response:
            """list levels; ?level=LVL or ?level=mod:LVL,... to change"""
            try:
                text = await _maybe_await(self.logging(req.arg("level")))
            except ValueError as err:
                return Response.text(400, f"{err}\n")
            return Response.text(200, text)

        async def explain(req: Request) -> Response:
            """JSON in: how would this proxy handle a request?"""
            if self.explain is None:
                return Response.json(501, {"error": "explain is not wired in this process"})
            try:
                body = json.loads(req.body or b"null")
            except (ValueError, UnicodeDecodeError) as err:
                return Response.json(400, {"error": f"body is not JSON: {err}"})
            if not isinstance(body, dict):
                return Response.json(400, {"error": "body must be a JSON object"})
            try:
                answer = await _maybe_await(self.explain(body))
            except ValueError as err:
                return Response.json(400, {"error": str(err)})
            return Response.json(200, answer)

        async def stats(req: Request) -> Response:
            """Envoy-style cluster stats, `name: value` lines; ?filter=RE2 keeps names it finds"""
            if self.stats is None:
                return Response.text(501, "stats are not wired in this process\n")
            lines = await _maybe_await(self.stats())
            pattern = req.arg("filter")
            if pattern:
                # Envoy's /stats ``filter`` is an RE2 regex searched in each name; RE2, so a crafted one cannot
                # stall the loop (linear time).
                try:
                    rx = re2.compile(pattern, _STATS_FILTER_OPTIONS)
                except re2.error as err:
                    return Response.text(400, f"bad filter {pattern!r}: {err}\n")
                lines = [(n, v) for n, v in lines if rx.search(n)]
            return Response.text(200, "".join(f"{n}: {v}\n" for n, v in lines))

        return {("GET", "/"): index, ("GET", "/config_dump"): config_dump,
                ("POST", "/quitquitquit"): quitquitquit, ("POST", "/logging"): logging_,
                ("POST", "/explain"): explain, ("GET", "/stats"): stats, ("GET", "/ready"): self._ready_handler()}

    def _metrics_routes(self) -> dict[tuple[str, str], Handler]:
        async def metrics(req: Request) -> Response:
            """Prometheus text exposition"""
            if self.metrics is None:
                return Response.text(503, "metrics are not wired in this process\n")
            arg = req.arg("worker")
            workers = self.worker_metrics
            if arg is None:
                if workers is not None:   # --workers N: every worker's numbers (proxy/admin/workers.py)
                    return Response(200, self._metrics_ct, await workers.merged())
                return Response(200, self._metrics_ct, await _maybe_await(self.metrics()))
            count = workers.workers if workers is not None else 1
            if not arg.isdigit() or int(arg) >= count:
                return Response.text(400, f"?worker= takes a worker index, 0..{count - 1}\n")
            if workers is None:
                return Response(200, self._metrics_ct, await _maybe_await(self.metrics()))
            one = await workers.one(int(arg))
            if one is None:
                return Response.text(503, f"worker {arg} did not answer (restarting?)\n")
            return Response(200, self._metrics_ct, one)
        return {("GET", "/metrics"): metrics, ("GET", "/stats/prometheus"): metrics}

    def _readiness_routes(self) -> dict[tuple[str, str], Handler]:
        return {("GET", "/healthz/ready"): self._ready_handler()}

    def _ready_handler(self) -> Handler:
        async def ready(req: Request) -> Response:
            """200 ready, or 503 with the reason"""
            reason = await _maybe_await(self.readiness())
            if reason:
                return Response.text(503, f"not ready: {reason}\n")
            return Response.text(200, "ready\n")
        return ready

    # ---- lifecycle ----
    async def start(self) -> None:
        started: list[HttpServer] = []
        try:
            for s in self.servers.values():
                await s.start()
                started.append(s)
        except BaseException:
            for s in started:
                await s.close()
            raise

    async def close(self) -> None:
        for s in self.servers.values():
            await s.close()

    async def __aenter__(self) -> "AdminServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return {name: s.address for name, s in self.servers.items()}

    def __repr__(self) -> str:
        parts = " ".join(f"{n}={h}:{p}" for n, (h, p) in self.addresses.items())
        return f"<AdminServer {parts}>"
