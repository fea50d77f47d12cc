"""A real waypoint on loopback for tests: our CA, the waypoint's HboneServer, "node proxies" (an
HBONE client pool, and per-pod HBONE terminators relaying to backend HTTP/TCP servers on 127.x pod
addresses). Backends say which version they are."""

from __future__ import annotations

import asyncio
import io
import json
import random
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from certs.rotation import MintingCertSource
from hbone.pool import HbonePool
from hbone.relay import relay
from hbone.server import HboneServer
from hbone.stream import TcpStream
from hbone.testing import Mesh
from policy.scope import WaypointScope
from proxy.http1.client import forward_request
from proxy.http1.server import serve_http1
from proxy.settings import ProxySettings
from proxy.snapshot import ConfigStore
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.waypoint import Waypoint

FIXTURES = Path(__file__).parent / "fixtures"
MESH = Mesh.create()
REVIEWS_PODS = ("127.1.0.21", "127.1.0.22", "127.1.0.23")
REVIEWS_VIP = "127.2.0.20"
TCP_VIP = "127.2.0.60"


def cert_source(ns: str, sa: str) -> MintingCertSource:
    return MintingCertSource(MESH.ca, MESH.identity(ns, sa), now=datetime.now(timezone.utc) - timedelta(minutes=5))


def tcp_inventory(pod_ip: str) -> str:
    """A TCP-only service (appProtocol tcp) behind the reviews waypoint, one pod."""
    return f"""
workloads:
- uid: Kubernetes//v1/Pod/default/tcp-echo-0
  name: tcp-echo-0
  namespace: default
  serviceAccount: tcp-echo
  workloadIps: ["{pod_ip}"]
  protocol: HBONE
  labels: {{app: tcp-echo}}
  services:
    default/tcp-echo.default.svc.cluster.local: {{9000: 9000}}
services:
- name: tcp-echo
  namespace: default
  hostname: tcp-echo.default.svc.cluster.local
  vips: ["/{TCP_VIP}"]
  ports: {{9000: 9000}}
  appProtocols: {{9000: tcp}}
  waypoint: {{destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
"""


def _istio_head(kind: str, name: str) -> str:
    return f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: default}}\nspec:\n"


def virtual_service(host: str, http: str) -> str:
    """A VirtualService of the default namespace, named after its one host ``host``, with these ``http``
    rules: YAML lines (``- match: ...``) at any common indentation."""
    rules = textwrap.indent(textwrap.dedent(http).strip("\n"), "  ")
    return _istio_head("VirtualService", host) + f"  hosts: [{host}]\n  http:\n{rules}\n"


def destination_rule(host: str, *, traffic_policy: str = "", subsets: tuple[str, ...] = ()) -> str:
    """A DestinationRule of the default namespace for ``host``.default.svc.cluster.local, named after it:
    ``traffic_policy`` a YAML flow mapping (``{connectionPool: ...}``), and a subset per version in
    ``subsets``, each selecting ``version: <its name>``."""
    text = _istio_head("DestinationRule", host) + f"  host: {host}.default.svc.cluster.local\n"
    if traffic_policy:
        text += f"  trafficPolicy: {traffic_policy}\n"
    if subsets:
        text += "  subsets:\n" + "".join(f"  - {{name: {v}, labels: {{version: {v}}}}}\n" for v in subsets)
    return text


def config_docs(*docs: str) -> str:
    """Several resources in one YAML stream (one config file)."""
    return "---\n".join(docs)


async def until(cond, what: str = "", timeout: float = 5.0) -> None:
    """Wait until ``cond()`` holds, polling: a bound against hanging, not a timing assertion."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never happened: {what or cond}")
        await asyncio.sleep(0.005)


async def send_big(responder, n: int, version: str) -> None:
    """A 200 with ``x-version``, its body ``n`` bytes of 0..255 over and over, sent 64 KiB at a time."""
    await responder.send_head(200, [(b"x-version", version.encode())])
    piece = bytes(range(256)) * 256
    sent = 0
    while sent < n:
        part = piece[: n - sent]
        await responder.send_body(part)
        sent += len(part)
    await responder.end()


async def backend_handler(version: str, request, responder) -> None:
    target = request.target.decode()
    path, _, query = target.partition("?")
    args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    body = b""
    async for chunk in request.body_chunks():
        body += chunk
    if path.startswith("/slow"):
        await asyncio.sleep(float(args.get("s", "1")))
    if path.startswith("/status/"):
        await responder.send_local_reply(int(path.rsplit("/", 1)[1]), version.encode())
        return
    if path.startswith("/big"):
        await send_big(responder, int(args["n"]), version)
        return
    if path.startswith("/headers"):
        data = json.dumps({k.decode(): v.decode() for k, v in request.headers}).encode()
        await responder.send_local_reply(200, data, [(b"x-version", version.encode()), (b"x-drop", b"1")])
        return
    await responder.send_local_reply(200, version.encode() + (b" " + body if body else b""),
                                     [(b"x-version", version.encode())])


@dataclass
class Pod:
    ip: str
    version: str
    hbone: HboneServer | None = None
    backend: asyncio.AbstractServer | None = None

    async def stop_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
            await self.backend.wait_closed()
            self.backend = None


def tcp_service(talk):
    """An ``asyncio.start_server`` callback: ``await talk(stream)`` on each connection's TcpStream; an OSError
    (the peer went away) ends it quietly, and the stream is closed after."""
    async def serve(reader, writer):
        stream = TcpStream(reader, writer)
        try:
            await talk(stream)
        except OSError:
            pass
        finally:
            stream.close()
    return serve


async def start_pod(ip: str, version: str, sa: str = "bookinfo-reviews", port: int = 9080, kind: str = "http") -> Pod:
    pod = Pod(ip, version)

    async def serve_http(reader, writer):
        await serve_http1(TcpStream(reader, writer), lambda rq, rs: backend_handler(version, rq, rs))

    async def echo(stream):   # with half-close
        while data := await stream.read():
            stream.write(data)
            await stream.drain()
        stream.write_eof()

    serve = serve_http if kind == "http" else tcp_service(echo)
    pod.backend = await asyncio.start_server(serve, ip, port, limit=256 * 1024)
    pod.hbone = await start_node_inbound(ip, sa)
    return pod


async def start_answering_pod(ip: str, version: str, answer) -> Pod:
    """A TCP pod on port 9000 (identity tcp-echo) behind its node proxy: for each connection ``await
    answer(stream)`` reads what it wants and returns what follows ``<version>:`` in the reply; then EOF."""
    async def talk(stream):
        reply = await answer(stream)
        stream.write(version.encode() + b":" + reply)
        await stream.drain()
        stream.write_eof()

    pod = Pod(ip, version)
    pod.backend = await asyncio.start_server(tcp_service(talk), ip, 9000)
    pod.hbone = await start_node_inbound(ip, "tcp-echo")
    return pod


async def start_node_inbound(ip: str, sa: str) -> HboneServer:
    """The destination node proxy in front of the pod at ip (identity sa): terminate, then plaintext to
    the pod's port from the CONNECT authority; a refused port is answered 503."""
    async def node_inbound(tunnel):
        try:
            up = await TcpStream.connect(ip, tunnel.authority[1])
        except OSError:
            await tunnel.reject(503, "upstream connect failed")
            return
        stream = await tunnel.accept()
        try:
            await relay(stream, up)
        finally:
            up.close()
            stream.close()

    src = cert_source("default", sa)
    return await HboneServer(src.server_context, node_inbound, trust_domain="cluster.local").start(ip, 15008)


@dataclass
class Harness:
    waypoint: Waypoint
    store: ConfigStore
    pods: dict[str, Pod]
    wp_ip: str
    metrics: Metrics
    log_sink: io.StringIO
    access_log: AccessLog
    pools: list = field(default_factory=list)

    def client(self, sa: str = "bookinfo-productpage") -> "Client":
        src = cert_source("default", sa)
        pool = HbonePool(src.client_context, trust_domain="cluster.local")
        self.pools.append(pool)
        return Client(pool, src, self)

    async def log_lines(self, n_min: int = 1, timeout: float = 3.0) -> list[dict]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = [json.loads(x) for x in self.log_sink.getvalue().splitlines() if x]
            if len(lines) >= n_min:
                return lines
            await asyncio.sleep(0.02)
        return [json.loads(x) for x in self.log_sink.getvalue().splitlines() if x]

    async def http_lines(self, n_min: int = 1, path: str | None = None, timeout: float = 5.0) -> list[dict]:
        """The access log's request lines (kind http; only ``path``'s when given), once there are at least
        ``n_min``: tunnel lines come and go in between, and the log is written by its own thread, so counting
        all lines (``log_lines``) can return before a request's own line is there."""
        end = time.monotonic() + timeout
        while True:
            lines = [x for x in (json.loads(x) for x in self.log_sink.getvalue().splitlines() if x)
                     if x.get("kind") == "http" and (path is None or x.get("path") == path)]
            if len(lines) >= n_min or time.monotonic() >= end:
                return lines
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for p in self.pools:
            await p.close()
        await self.waypoint.close()
        for pod in self.pods.values():
            await pod.stop_backend()
            if pod.hbone is not None:
                await pod.hbone.close()
        self.access_log.close()


@dataclass
class Client:
    pool: HbonePool
    src: MintingCertSource
    h: Harness

    async def tunnel(self, authority: str, source: str = "127.0.0.1"):
        """A tunnel to the waypoint for ``authority``, as a node proxy opens it for a client at ``source``
        (its ``forwarded: for=``)."""
        return await self.pool.open_tunnel(
            src_identity=self.src.identity, dst_identities=frozenset({MESH.identity("default", "reviews-waypoint")}),
            dst=(self.h.wp_ip, 15008), authority=authority, headers={"forwarded": f'for="{source}:5555"'})

    async def request(self, stream, path: str = "/", method: bytes = b"GET", headers=(), body=None,
                      host: bytes = b"reviews:9080") -> tuple[int, dict, bytes]:
        resp = await forward_request(stream, method, path.encode(), host, list(headers), body)
        data = b""
        async for chunk in resp.body_chunks():
            data += chunk
        return resp.status, {k.decode(): v.decode() for k, v in resp.headers}, data

    async def fetch(self, path: str = "/", method: bytes = b"GET", headers=(), *,
                    source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
        """One HTTP/1.1 request to reviews on a tunnel of its own (from ``source``), closed after:
        (status, headers, body)."""
        stream = await self.tunnel(f"{REVIEWS_VIP}:9080", source)
        try:
            return await self.request(stream, path, method=method, headers=list(headers))
        finally:
            stream.close()


async def start_harness(tmp_path: Path, loopback_ip, *, routing: str | None = "default", authz: bool = True,
                        extra: str = "", tcp_pod: bool = False, httproute: bool = False,
                        rng: random.Random | None = None) -> Harness:
    inv = (FIXTURES / "bookinfo" / "inventory.yaml").read_text()
    ips = {old: loopback_ip() for old in REVIEWS_PODS}
    for old, new in ips.items():
        inv = inv.replace(f'"{old}"', f'"{new}"')
    wp_ip = loopback_ip()
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "inventory.yaml").write_text(inv)
    (cfg / "waypoint.yaml").write_text((FIXTURES / "bookinfo" / "waypoint.yaml").read_text())
    if authz:
        (cfg / "authz.yaml").write_text((FIXTURES / "bookinfo" / "authz.yaml").read_text())
    if httproute:
        (cfg / "routing.yaml").write_text((FIXTURES / "bookinfo-httproute.yaml").read_text())
    elif routing == "default":
        (cfg / "routing.yaml").write_text((FIXTURES / "bookinfo" / "reviews-routing.yaml").read_text())
    elif routing:
        (cfg / "routing.yaml").write_text(routing)
    pods = {}
    for old, new in ips.items():
        pods[new] = await start_pod(new, "v" + old[-1])
    if tcp_pod:
        tip = loopback_ip()
        (cfg / "tcp.yaml").write_text(tcp_inventory(tip))
        pods[tip] = await start_pod(tip, "tcp", sa="tcp-echo", port=9000, kind="echo")
    if extra:
        (cfg / "extra.yaml").write_text(extra)
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip=wp_ip)
    store = ConfigStore([str(cfg)], mode="waypoint", scope=scope, clock=time.time)
    store.load()
    metrics = Metrics(process_metrics=False)
    sink = io.StringIO()
    access_log = AccessLog(sink, metrics=metrics)
    settings = ProxySettings(mode="waypoint", config_paths=(str(cfg),), hbone_addr=(wp_ip, 15008))
    wp = await Waypoint.start(settings, store, cert_source("default", "reviews-waypoint"), metrics, access_log,
                              rng=rng or random.Random(7))
    return Harness(wp, store, pods, wp_ip, metrics, sink, access_log)
