"""RequestAuthentication key sets named by URL (``jwksUri``, or OpenID discovery from the issuer), fetched by the
waypoint as istiod's jwks_resolver.go fetches them: the pure part (policy/authn/remote.py), the fetch and the
cache (proxy/jwks_resolver.py) against a real HTTP server on a loopback address, the config store putting the
fetched keys into a real waypoint's snapshot, and the ``hbone-proxy run`` process catching up with a key set
its identity provider served late."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from certs.ca import MeshCA
from policy.authn.jwks import JwksError
from policy.authn.parse import parse_request_authentication
from policy.authn.remote import KeySource, jwks_uri_from_discovery, remote_sources, with_key_sets
from policy.errors import Where
from proxy.jwks_resolver import (JWKS_FETCH_MAX_BYTES, JWKS_REFRESH_BACKOFF_MAX_S, JWKS_REFRESH_INTERVAL_S,
                                 JWKS_REFRESH_ON_FAILURE_S, JWKS_RETRIES_ON_REFRESH, JWKS_STALE_AFTER_S, FetchError,
                                 JwksResolver, http_get, next_refresh_interval)
from tests.conftest import free_port
from tests.test_authn_verify import Issuer

ISSUER = Issuer("https://idp.example.com", alg="ES256", kid="k1")
ROTATED = Issuer("https://idp.example.com", alg="ES256", kid="k2", key=ec.generate_private_key(ec.SECP256R1()))
REPO = Path(__file__).resolve().parent.parent


class IdP:
    """An identity provider on a loopback address: ``routes`` maps a path to (status, body, extra headers);
    ``hits`` counts the requests per path. ``/slow`` answers its head, then drips one byte a second."""

    def __init__(self, ip: str):
        self.routes: dict[str, tuple[int, bytes, dict]] = {}
        self.hits: dict[str, int] = {}
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):   # noqa: N802 — http.server's name
                idp.hits[self.path] = idp.hits.get(self.path, 0) + 1
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    for _ in range(100):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.1)
                    return
                status, body, headers = idp.routes.get(self.path, (404, b"not found", {}))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((ip, 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://{ip}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, path: str, body: str | bytes, status: int = 200, **headers) -> str:
        self.routes[path] = (status, body.encode() if isinstance(body, str) else body, headers)
        return self.base + path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp(loopback_ip):
    server = IdP(loopback_ip())
    yield server
    server.close()


def _ra(rules: list[dict], name: str = "jwt") -> object:
    doc = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}], "jwtRules": rules}}
    return parse_request_authentication(doc, Where("ra.yaml"))


# ---------------------------------------------------------------------------------------------
# The pure part


def test_remote_sources_are_the_rules_without_an_inline_key_set_once_each():
    ra1 = _ra([{"issuer": "a", "jwksUri": "https://a/keys"}, {"issuer": "b", "jwks": ISSUER.jwks()},
               {"issuer": "c"}])
    ra2 = _ra([{"issuer": "a", "jwksUri": "https://a/keys", "timeout": "2s"}], name="other")
    assert remote_sources([ra1, ra2]) == (KeySource("a", "https://a/keys", 5.0), KeySource("c", "", 5.0))
    assert KeySource("https://idp/", "", 5.0).discovery_url == "https://idp/.well-known/openid-configuration"


def test_with_key_sets_puts_fetched_keys_in_place_of_the_fake_ones_only():
    from policy.authn.jwks import parse_jwks
    ra = _ra([{"issuer": "a", "jwksUri": "https://a/keys"}, {"issuer": "b", "jwks": ISSUER.jwks()},
              {"issuer": "c"}])
    inline = _ra([{"issuer": "b", "jwks": ISSUER.jwks()}], name="inline")
    fetched = parse_jwks(ISSUER.jwks())
    (out, same) = with_key_sets([ra, inline], {("a", "https://a/keys"): fetched})
    assert out.jwt_rules[0].jwks is fetched and not out.jwt_rules[0].jwks.fake
    assert out.jwt_rules[1] is ra.jwt_rules[1] and out.jwt_rules[2] is ra.jwt_rules[2]   # inline; not fetched
    assert same is inline                                                                # nothing to change
    assert with_key_sets([ra], {}) == (ra,)


@pytest.mark.parametrize("body,problem", [
    (b"not json", "not a JSON object"), (b"[]", "not a JSON object"), (b"[" * 100_000, "not a JSON object"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "not a JSON object"), (b'{"jwks_uri": 7}', "invalid jwks_uri 7"),
    (b'{"issuer": "x"}', "invalid jwks_uri None in openID discovery configuration"),
])
def test_a_discovery_document_without_a_jwks_uri_is_an_error(body, problem):
    assert jwks_uri_from_discovery(b'{"jwks_uri": "https://idp/keys"}') == "https://idp/keys"
    with pytest.raises(JwksError, match=problem):
        jwks_uri_from_discovery(body)


def test_the_refresh_schedule_is_istiods():
    assert next_refresh_interval(JWKS_REFRESH_INTERVAL_S, errors=False, last_errors=False) == 20 * 60
    assert next_refresh_interval(JWKS_REFRESH_INTERVAL_S, errors=True, last_errors=False) == JWKS_REFRESH_ON_FAILURE_S
    assert next_refresh_interval(60.0, errors=True, last_errors=True) == 120.0
    assert next_refresh_interval(3000.0, errors=True, last_errors=True) == JWKS_REFRESH_BACKOFF_MAX_S
    assert next_refresh_interval(3600.0, errors=False, last_errors=True) == JWKS_REFRESH_INTERVAL_S


# ---------------------------------------------------------------------------------------------
# The fetch


def test_http_get_answers_the_body_or_says_why_not(idp):
    assert http_get(idp.serve("/keys", ISSUER.jwks()), 2.0, JWKS_FETCH_MAX_BYTES) == ISSUER.jwks().encode()
    with pytest.raises(FetchError, match="status 503"):
        http_get(idp.serve("/down", "busy", status=503), 2.0, 1000)
    with pytest.raises(FetchError, match="longer than 10 bytes"):
        http_get(idp.serve("/big", "x" * 11), 2.0, 10)
    # Redirects are followed within http(s), never to a file.
    assert http_get(idp.serve("/moved", "", status=302, Location=idp.base + "/keys"), 2.0, 100_000) \
        == ISSUER.jwks().encode()
    with pytest.raises(FetchError):
        http_get(idp.serve("/evil", "", status=302, Location="file:///etc/passwd"), 2.0, 100_000)
    with pytest.raises(FetchError, match="not http or https"):
        http_get("file:///etc/passwd", 2.0, 100_000)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="within 0.5 s"):
        http_get(idp.base + "/slow", 0.5, 1000)   # a dripping answer is cut at its deadline
    assert time.monotonic() - t0 < 2.0


def test_proxies_from_the_environment_are_not_used_for_loopback(idp, monkeypatch):
    # (Go's http.ProxyFromEnvironment, istiod's client: loopback is never proxied.)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert http_get(idp.serve("/keys", ISSUER.jwks()), 2.0, JWKS_FETCH_MAX_BYTES) == ISSUER.jwks().encode()
    with pytest.raises(FetchError, match="Connection refused"):   # another host goes to the (dead) proxy
        http_get("http://idp.invalid/keys", 2.0, 1000)


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b"HTTP/1.1 2",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_a_hostile_answer_is_a_failed_fetch(loopback_ip, answer):
    """Whatever comes back, a fetch fails with FetchError (and _attempt turns anything into a failed fetch)."""
    import socket
    ip = loopback_ip()
    srv = socket.create_server((ip, 0))
    port = srv.getsockname()[1]

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(FetchError):
            http_get(f"http://{ip}:{port}/keys", 2.0, JWKS_FETCH_MAX_BYTES)
    finally:
        t.join(5)
        srv.close()


def test_http_get_of_a_closed_port_fails_quickly(loopback_ip):
    with pytest.raises(FetchError):
        http_get(f"http://{loopback_ip()}:9/keys", 2.0, 1000)


# ---------------------------------------------------------------------------------------------
# The cache


def test_a_build_fetches_once_then_the_cache_answers(idp):
    uri = idp.serve("/keys", ISSUER.jwks())
    resolver = JwksResolver()
    sources = [KeySource(ISSUER.iss, uri, 2.0)]
    first = resolver.key_sets(sources)
    assert first[(ISSUER.iss, uri)].keys[0].kid == "k1" and not first[(ISSUER.iss, uri)].fake
    assert resolver.key_sets(sources)[(ISSUER.iss, uri)] is first[(ISSUER.iss, uri)]
    assert idp.hits["/keys"] == 1 and resolver.fetches_ok == 1
    # A config that no longer names the source: forgotten, and fetched anew if it comes back.
    assert resolver.key_sets([]) == {} and len(resolver) == 0
    resolver.key_sets(sources)
    assert idp.hits["/keys"] == 2


def test_openid_discovery_names_the_key_set(idp):
    uri = idp.serve("/oauth2/keys", ISSUER.jwks())
    idp.serve("/.well-known/openid-configuration", json.dumps({"issuer": idp.base, "jwks_uri": uri}))
    got = JwksResolver().key_sets([KeySource(idp.base + "/", "", 2.0)])
    assert got[(idp.base + "/", "")].keys[0].kid == "k1"


@pytest.mark.parametrize("route", [("/keys", "busy", 503), ("/keys", "{not json", 200),
                                   ("/keys", '{"keys": []}', 200)])
def test_a_failed_first_fetch_keeps_the_fake_key_set_and_wakes_the_refresher(idp, route):
    path, body, status = route
    uri = idp.serve(path, body, status=status)
    woken = []
    resolver = JwksResolver(on_missing=lambda: woken.append(True), sleep=lambda s: None)
    assert resolver.key_sets([KeySource(ISSUER.iss, uri, 2.0)]) == {}
    assert woken == [True] and resolver.fetches_failed == 1 and idp.hits[path] == 1   # no retry in a build
    # A build meanwhile does not fetch again (istiod: errEmptyPubKeyFoundInCache); the refresher does.
    assert resolver.key_sets([KeySource(ISSUER.iss, uri, 2.0)]) == {} and idp.hits[path] == 1
    idp.serve(path, ISSUER.jwks())
    assert resolver.refresh(only_missing=True) == (True, False)
    assert resolver.key_sets([KeySource(ISSUER.iss, uri, 2.0)])[(ISSUER.iss, uri)].keys[0].kid == "k1"


def test_refresh_sees_a_rotation_keeps_the_last_good_keys_and_drops_stale_ones(idp):
    now = [1000.0]
    sleeps = []
    uri = idp.serve("/keys", ISSUER.jwks())
    resolver = JwksResolver(clock=lambda: now[0], sleep=sleeps.append)
    src = [KeySource(ISSUER.iss, uri, 2.0)]
    resolver.key_sets(src)
    # The same keys served again, re-serialised: no change, no reload.
    idp.serve("/keys", json.dumps({"keys": [ISSUER.jwk()]}, indent=2))
    assert resolver.refresh() == (False, False)
    assert resolver.refresh(only_missing=True) == (False, False) and idp.hits["/keys"] == 2   # nothing missing
    # Rotation: a new key.
    idp.serve("/keys", ROTATED.jwks())
    assert resolver.refresh() == (True, False)
    assert resolver.key_sets(src)[(ISSUER.iss, uri)].keys[0].kid == "k2"
    # The provider fails: retried JWKS_RETRIES_ON_REFRESH times a second apart, the last good keys kept.
    idp.serve("/keys", "down", status=500)
    before = idp.hits["/keys"]
    assert resolver.refresh() == (False, True)
    assert idp.hits["/keys"] - before == JWKS_RETRIES_ON_REFRESH + 1 and sleeps == [1.0] * JWKS_RETRIES_ON_REFRESH
    assert resolver.key_sets(src)[(ISSUER.iss, uri)].keys[0].kid == "k2"
    # Not refreshed for 7 days: dropped (the fake key set stands in again), which is a change to reload for.
    now[0] += JWKS_STALE_AFTER_S
    assert resolver.refresh() == (True, True)
    assert resolver.key_sets(src) == {}


def test_a_build_does_not_wait_for_a_fetch_past_its_timeout():
    """A fetch that outlives its timeout (a hung name lookup is not bounded by the socket timeout) is a failed
    one for the build, which goes on."""
    release = threading.Event()

    def hung(url, timeout_s, max_bytes):
        release.wait(10)
        raise FetchError("released")

    resolver = JwksResolver(fetch=hung)
    t0 = time.monotonic()
    assert resolver.key_sets([KeySource("a", "http://idp.example/keys", 0.2)]) == {}
    assert time.monotonic() - t0 < 0.2 + 1.0 + 0.5
    release.set()


# ---------------------------------------------------------------------------------------------
# Through a real waypoint


def _token(issuer: Issuer) -> str:
    now = int(time.time())
    return issuer.mint(None, sub="alice", iat=now - 10, exp=now + 3600)


async def test_the_waypoint_uses_the_fetched_key_set(tmp_path, loopback_ip, idp):
    from tests.waypoint_harness import REVIEWS_VIP, start_harness
    uri = idp.serve("/keys", ISSUER.jwks())
    ra = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
          "metadata": {"name": "reviews-jwt", "namespace": "default"},
          "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                   "jwtRules": [{"issuer": ISSUER.iss, "jwksUri": uri}]}}
    h = await start_harness(tmp_path, loopback_ip, extra=yaml.safe_dump(ra))
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        bearer = [(b"authorization", b"Bearer " + _token(ISSUER).encode())]
        # A store without a resolver (as `config check` loads): istiod's fake key set, every token refused.
        status, _, body = await c.request(stream, "/", headers=bearer)
        assert (status, body) == (401, b"Jwks doesn't have key to match kid or alg from Jwt")
        h.store.jwks = resolver = JwksResolver()
        h.store.load()
        assert (await c.request(stream, "/", headers=bearer))[0] == 200
        # Key rotation at the provider, seen by a refresh, in the next snapshot.
        idp.serve("/keys", ROTATED.jwks())
        assert resolver.refresh() == (True, False)
        h.store.load()
        assert (await c.request(stream, "/", headers=bearer))[0] == 401
        status = (await c.request(stream, "/", headers=[(b"authorization",
                                                         b"Bearer " + _token(ROTATED).encode())]))[0]
        assert status == 200
    finally:
        await h.close()


def test_the_proxy_process_catches_up_with_a_key_set_served_late(tmp_path, loopback_ip, idp):
    """``hbone-proxy run --mode waypoint``: the identity provider answers 503 at start (the config loads with the
    fake key set), then the key set; the refresher's catch-up round fetches it and the config is reloaded."""
    uri = idp.serve("/keys", "starting", status=503)
    inv = (REPO / "tests" / "fixtures" / "bookinfo" / "inventory.yaml").read_text()
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "inventory.yaml").write_text(inv)
    (cfg / "waypoint.yaml").write_text((REPO / "tests" / "fixtures" / "bookinfo" / "waypoint.yaml").read_text())
    (cfg / "ra.yaml").write_text(yaml.safe_dump({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "reviews-jwt", "namespace": "default"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                 "jwtRules": [{"issuer": ISSUER.iss, "jwksUri": uri, "timeout": "1s"}]}}))
    wp_ip = metrics_ip = loopback_ip()
    metrics_port = free_port(metrics_ip)
    MeshCA.init(tmp_path / "ca", now=datetime.now(timezone.utc) - timedelta(hours=1))
    argv = [sys.executable, "-m", "proxy.cli", "run", "--mode", "waypoint", "--config", str(cfg),
            "--ca-dir", str(tmp_path / "ca"), "--identity", "default/reviews-waypoint",
            "--gateway", "default/reviews-waypoint",
            "--hbone-addr", f"{wp_ip}:15008", "--admin-addr", "off", "--metrics-addr", f"{metrics_ip}:{metrics_port}",
            "--readiness-addr", "off", "--access-log", "off", "--config-poll-interval", "0"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("proxy ready" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        assert any("cannot fetch the JWT key set" in line and "status 503" in line for line in lines), "".join(lines)
        idp.serve("/keys", ISSUER.jwks())
        while time.monotonic() < deadline and not any("config reloaded" in line for line in lines):
            time.sleep(0.05)
        text = "".join(lines)
        assert "fetched the JWT key set for issuer 'https://idp.example.com' from " + uri + " (1 keys)" in text, text
        assert "config reloaded: version 2" in text, text
        with urllib.request.urlopen(f"http://{metrics_ip}:{metrics_port}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
        assert "pilot_jwks_resolver_network_fetch_success_total 1.0" in scraped, scraped
        # (The start's fetch failed; so may the catch-up round's first tries, before the provider answers.)
        fails = [float(line.split()[1]) for line in scraped.splitlines()
                 if line.startswith("pilot_jwks_resolver_network_fetch_fail_total ")]
        assert fails and fails[0] >= 1.0, scraped
    finally:
        proc.terminate()
        proc.wait(timeout=30)
