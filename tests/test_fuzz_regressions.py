"""Inputs found by coverage-guided fuzzing (atheris, session of 2026-11-26) of the pure parsers,
each pinned with the answer it must get. Each test names the parser, the symptom the input caused
before its fix, and the rule that decides the right answer."""

from __future__ import annotations

import pytest

from proxy.http1.codec import Http1Error, MessageEnd, ResponseHead, ResponseReader
from hbone.connect import ConnectRequest
from hbone.errors import BadRequest
from proxy.origdst import parse_sockaddr

# ---- proxy/http1/codec.py ----------------------------------------------------------------------

_HEAD_CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\n"
_STRAY = b"HTTP/1.1 304 Not Modified\r\n\r\n"


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("split", [False, True, "expect-again"])
def test_response_after_a_closing_response_is_refused_however_it_is_split(method, split):
    """A response that ends its connection (no keep-alive) must be the last one: bytes after it
    answer no request (a desync if read as a next response). llhttp refuses them ("Data after
    `Connection: close`", 502); the HEAD path restarts llhttp itself and, before the fix, dropped
    them when they came in the same read but parsed them as a second response when they came in the
    next one. Fuzz input: a HEAD response without keep-alive, then a 304, split between reads."""
    reader = ResponseReader()
    reader.expect(method)
    head = _HEAD_CLOSE + (b"0123456789" if method == b"GET" else b"")
    pieces = [head, _STRAY] if split else [head + _STRAY]
    # (a second fuzz input: HTTP/1.0 200 without keep-alive to HEAD, then bytes, expect(HEAD) again)
    events = []
    with pytest.raises(Http1Error) as err:
        for piece in pieces:
            events += reader.feed(piece)
            if split == "expect-again" and events and events[-1] is MessageEnd:
                reader.expect(method)   # a caller that goes on as if the connection were reusable
        reader.feed_eof()
    assert err.value.status == 502
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert [h.status for h in heads] == [200] and events[-1] is MessageEnd


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_response_head_cut_short_by_eof_is_an_error_for_head_too(method):
    """RFC 9112 §8: a message cut short by the connection closing is incomplete. The HEAD path holds
    the head's bytes until its blank line, so before the fix an EOF there returned no events and no
    error, where the GET path answers 502. Fuzz input: a HEAD response head cut mid-header."""
    reader = ResponseReader()
    reader.expect(method)
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Le") == []
    with pytest.raises(Http1Error) as err:
        reader.feed_eof()
    assert err.value.status == 502 and reader.failed is err.value


# ---- proxy/origdst.py --------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"\x02", b"\x02\x00\x1f"])
def test_short_sockaddr_is_a_value_error(raw):
    """original_dst falls back to getsockname() on (OSError, ValueError); before the fix a sockaddr
    shorter than its 4-byte family + port head raised struct.error, which is neither, so it would
    have escaped original_dst. Fuzz input: b"" (and any 1-3 bytes)."""
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


# ---- hbone/connect.py --------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"99f\n", b"x-a\n", b"baggage\n"])
def test_header_name_with_a_trailing_newline_is_refused(name):
    """RFC 9113 §8.2.1: a field name is a token, and CR/LF/NUL anywhere make the request malformed.
    The name check was `re.match` with `^...$`, and `$` also matches before a final newline, so
    b"99f\\n" was taken as a valid name and passed on in ConnectRequest.headers (the value check
    covers values only). Fuzz input: a CONNECT with a header named b"99f\\n"."""
    headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (name, b"v")]
    with pytest.raises(BadRequest) as err:
        ConnectRequest.from_h2_headers(headers)
    assert err.value.status == 400 and "bad header name" in err.value.reason


# ---- policy/loader.py --------------------------------------------------------------------------

_WORKLOAD = {"uid": "Kubernetes//v1/Pod/default/w-0", "name": "w-0", "namespace": "default",
             "workloadIps": ["127.1.0.21"], "protocol": "HBONE", "node": "node-b",
             "labels": {"app": "w"}}


@pytest.mark.parametrize("field, value", [
    ("namespace", "default\n"),                 # _DNS_LABEL
    ("labels", {"app\n": "w"}),                 # _LABEL_NAME, a key
    ("labels", {"app": "w\n"}),                 # _LABEL_NAME, a value
    ("labels", {"example.com\n/app": "w"}),     # _DNS_NAME_LABEL, through a label key's prefix
])
def test_names_with_a_trailing_newline_are_refused(field, value):
    """The name checks were `re.match` with `^...$`, and `$` also matches before a final newline:
    `namespace: "default\\n"` loaded as a namespace no policy or peer could ever name (a policy in it
    silently applies to nothing). The same `$` bug as hbone/connect.py's header-name check, found by
    fuzzing there; each check here is now a fullmatch."""
    from policy.errors import ConfigErrors, Where
    from policy.loader import build_mesh_config

    doc = {"workloads": [dict(_WORKLOAD, **{field: value})]}
    with pytest.raises(ConfigErrors) as err:
        build_mesh_config([(Where("inv.yaml", 1), doc)])
    assert "not a valid" in err.value.message


def test_a_million_bad_entries_report_a_bounded_number_of_problems():
    """A 20 KB list of 10 000 numbers where workloads go was 10 000 ConfigErrors; at the 1M nodes a
    document may hold (a 2 MiB file) it measured 14.6 s, 1 GiB RSS and an 86 MiB message. The first
    MAX_REPORTED_ERRORS problems are reported, then one line saying the rest was not read."""
    from policy.documents import load_text
    from policy.errors import ConfigErrors
    from policy.loader import MAX_REPORTED_ERRORS, build_mesh_config

    text = "workloads: [" + ",".join(["1"] * 10_000) + "]"
    with pytest.raises(ConfigErrors) as err:
        build_mesh_config(load_text(text, "big.yaml"))
    lines = err.value.message.splitlines()
    assert len(lines) == MAX_REPORTED_ERRORS + 1
    assert lines[0] == "big.yaml: document 1 (Workload): workloads[0]: expected a mapping, got a number (1)"
    assert lines[-1] == (f"big.yaml: document 1 (Workload): more than {MAX_REPORTED_ERRORS} problems; "
                         "the rest of the configuration was not checked")


# ---- hbone/protocol.py + hbone/_h2fast.py ------------------------------------------------------

def _client_hello() -> bytes:
    import h2.config
    import h2.connection
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()   # the preface and SETTINGS, no stream yet
    return client.data_to_send()


def _connect_headers(stream_id: int) -> bytes:
    import h2.config
    import h2.connection
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.clear_outbound_data_buffer()
    client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    return client.data_to_send()


@pytest.mark.parametrize("who", ["server", "peer"])
def test_goaway_before_any_stream_keeps_the_connection_usable(who):
    """h2's graceful-GOAWAY table (hbone/_h2fast.py 2.) covered the open states only: a GOAWAY sent
    (a drain) or received on a connection that had exchanged SETTINGS but no stream yet moved h2 to
    CLOSED, and the next keepalive `ServerCore.ping` raised h2's ProtocolError out of the core (in the
    shell: out of the ping timer's callback, which then never ran again). A HEADERS frame then was a
    connection PROTOCOL_ERROR instead of RFC 9113 §8.7's REFUSED_STREAM. Fuzz input: SETTINGS
    exchanged, goaway(), ping()."""
    from h2.errors import ErrorCodes
    from hbone.protocol import ConnectionTerminated, ServerCore, StreamRefused
    from hyperframe.frame import GoAwayFrame

    core = ServerCore(clock=lambda: 0.0)
    core.receive_data(_client_hello())
    if who == "server":
        core.goaway()
    else:
        assert [e.__class__ for e in core.receive_data(GoAwayFrame(0).serialize())] == [ConnectionTerminated]
    core.data_to_send()
    core.ping(b"12345678")   # raised ProtocolError("Invalid input ... SEND_PING in state CLOSED")
    assert b"12345678" in core.data_to_send()
    events = core.receive_data(_connect_headers(1))
    if who == "server":   # our GOAWAY said no new streams: refused, the connection stays up
        assert not core.closed
        assert core.tunnel_state(1) is None and not any(isinstance(e, ConnectionTerminated) for e in events)
        assert any(isinstance(e, StreamRefused) for e in events) or core.stream_closed(1)
    else:                 # the peer's GOAWAY limits our streams, not theirs: served as usual
        assert [e.__class__.__name__ for e in events] == ["TunnelRequested"]
    assert not [e for e in events if isinstance(e, ConnectionTerminated) and e.code == ErrorCodes.PROTOCOL_ERROR]


# ---- policy/documents.py -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [   # ids: what escaped load_text before the fix
    pytest.param("!!timestamp greeter", id="AttributeError"),   # the fuzz input: a canonicalName
    pytest.param("!!bool maybe", id="KeyError"),
    pytest.param("!!int ''", id="IndexError-int"),
    pytest.param("!!float ''", id="IndexError-float"),
    pytest.param("!!int 0x", id="ValueError-was-already-a-ConfigError"),
])
def test_explicit_yaml_tag_that_does_not_fit_its_value_is_a_config_error(value):
    """PyYAML's safe constructors raise plain Python errors when an explicit tag does not fit the
    scalar: AttributeError, KeyError and IndexError escaped load_text (only ValueError, OverflowError,
    TypeError were turned into a ConfigError)."""
    from policy.documents import load_text
    from policy.errors import ConfigError

    text = f"workloads:\n- name: w\n  canonicalName: {value}\n"
    with pytest.raises(ConfigError) as err:
        load_text(text, "inv.yaml")
    assert err.value.message.startswith("inv.yaml: document 1: invalid value")


def test_a_ping_h2_refuses_ends_the_connection_instead_of_raising_out_of_the_keepalive_timer():
    """Defence behind the fix above: whatever else may leave h2 CLOSED while the core still thinks the
    connection open, ``ping`` must not raise (the shell calls it from its keepalive timer, which would
    then never run again): the core counts the connection as over, and the shell closes it."""
    from h2.connection import ConnectionState
    from hbone.protocol import ServerCore

    core = ServerCore(clock=lambda: 0.0)
    core.receive_data(_client_hello())
    core.data_to_send()
    core._h2.state_machine.state = ConnectionState.CLOSED   # (no known input gets here any more)
    core.ping(b"12345678")
    assert core.closed and b"12345678" not in core.data_to_send()


def test_the_keepalive_timer_survives_a_refused_ping_and_the_connection_ends():
    import asyncio

    from h2.connection import ConnectionState
    from hbone.settings import HboneSettings
    from hbone.testing import Mesh
    from tests.test_hbone_pool import PoolEnv

    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        async with PoolEnv(Mesh.create(), HboneSettings(ping_interval=0.05, ping_timeout=5.0)) as env:
            await env.open()
            (conn,) = env.pool.connections()
            conn.core._h2.state_machine.state = ConnectionState.CLOSED
            for _ in range(100):
                if conn.lost:
                    break
                await asyncio.sleep(0.02)
            assert conn.lost and conn.core.closed
        assert not errors, errors   # nothing escaped a callback (before: ProtocolError from _ping_tick)

    asyncio.run(main())
