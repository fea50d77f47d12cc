"""proxy/tlsinspect.py: the ClientHello parser (Envoy tls_inspector's core). Real ClientHellos from Python's
ssl (TLS 1.3 and 1.2, with and without SNI / ALPN), whole, byte by byte, re-framed into many records and with
trailing data; hand-built hellos for each RFC rule broken; the size limit; and hypothesis junk, where only
ClientHelloTooLarge may escape."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.tlsinspect import (
    CLIENT_HELLO_MAX_BYTES, ClientHelloTooLarge, Inspection, TlsInspectError, inspect_client_hello as inspect,
)


def real_hello(sni: str | None, *, alpn=(), tls12: bool = False) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(etype: int, body: bytes) -> bytes:
    return u16(etype) + u16(len(body)) + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    lst = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(lst)) + lst)


def hello(exts: bytes | None = None, *, version=b"\x03\x03", session=b"", suites=b"\x13\x01",
          comp=b"\x00", msg_type: int = 1, tail: bytes = b"") -> bytes:
    """A ClientHello handshake message (RFC 8446 §4.1.2) built field by field."""
    body = version + bytes(32) + bytes([len(session)]) + session + u16(len(suites)) + suites \
        + bytes([len(comp)]) + comp
    if exts is not None:
        body += u16(len(exts)) + exts
    body += tail
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 2 ** 14, *, ctype: int = 0x16, version=b"\x03\x01") -> bytes:
    out = b""
    for i in range(0, len(message), size):
        frag = message[i:i + size]
        out += bytes([ctype]) + version + u16(len(frag)) + frag
    return out


# ---------------------------------------------------------------------------------------------
# Real ClientHellos


@pytest.mark.parametrize("tls12", [False, True])
@pytest.mark.parametrize("sni,alpn", [("a.example.com", ("h2", "http/1.1")), ("tcp-echo.default.svc.cluster.local", ()),
                                      (None, ("h2",))])
def test_real_client_hellos_whole(sni, alpn, tls12):
    data = real_hello(sni, alpn=alpn, tls12=tls12)
    got = inspect(data)
    assert got == Inspection("tls", sni, tuple(alpn), len(data)) and got.is_tls and got.stat == "tls_found"


def test_byte_by_byte_every_prefix_is_incomplete_until_the_last_byte():
    data = real_hello("b.example.com", alpn=("h2",))
    for k in range(len(data)):
        assert inspect(data[:k]).state == "incomplete", k
    assert inspect(data).server_name == "b.example.com"


def test_trailing_data_is_not_looked_at_and_length_says_where_the_hello_ends():
    data = real_hello("a.example.com")
    for tail in (b"\x17\x03\x03\x00\x05hello", b"\x00" * 100, b"GET / HTTP/1.1\r\n"):
        got = inspect(data + tail)
        assert got.server_name == "a.example.com" and got.length == len(data)


@pytest.mark.parametrize("size", [1, 7, 100])
def test_a_hello_split_over_many_records_parses_and_prefixes_stay_incomplete(size):
    message = real_hello("split.example.com")[5:]       # the handshake message, out of its one record
    data = records(message, size)
    assert inspect(data) == Inspection("tls", "split.example.com", (), len(data))
    if size == 100:
        assert all(inspect(data[:k]).state == "incomplete" for k in range(len(data)))


def test_the_message_whole_inside_a_longer_record_is_enough():
    message = hello(sni_ext(b"x.example.com"))
    data = records(message + b"\x10\x00\x00\x00")       # another handshake message after it, same record
    assert inspect(data).server_name == "x.example.com"


# ---------------------------------------------------------------------------------------------
# Not TLS, malformed, too large


@pytest.mark.parametrize("data", [b"G", b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0", b"\x00", b"\x16\x01",
                                  b"\x17\x03\x03"])
def test_plaintext_is_not_tls_from_the_first_bytes(data):
    got = inspect(data)
    assert got.state == "not_tls" and got.stat == "tls_not_found" and got.reason


def test_empty_and_the_first_byte_of_a_record_are_incomplete():
    assert inspect(b"").state == "incomplete" and inspect(b"\x16").state == "incomplete"
    assert inspect(b"\x16\x03\x01\x02").state == "incomplete"


GOOD = sni_ext(b"a.example.com")
MALFORMED = [
    (records(hello(GOOD, msg_type=2)), "not a ClientHello"),
    (records(hello(GOOD + GOOD)), "appears twice"),
    (records(hello(sni_ext(b"a.example.com", b"b.example.com"))), "more than one server name"),
    (records(hello(sni_ext(b"a.example.com", name_type=1))), "not a host_name"),
    (records(hello(sni_ext(b"a\x00b"))), "without NUL"),
    (records(hello(sni_ext(b""))), "1..255 bytes"),
    (records(hello(sni_ext(b"a" * 256))), "1..255 bytes"),
    (records(hello(sni_ext("é.example.com".encode()))), "not ASCII"),
    (records(hello(ext(0, u16(20) + b"\x00\x00\x01a"))), "runs past the end"),
    (records(hello(GOOD, session=bytes(33))), "longer than 32"),
    (records(hello(GOOD, suites=b"\x13")), "at least one 2-byte suite"),
    (records(hello(GOOD, suites=b"")), "at least one 2-byte suite"),
    (records(hello(GOOD, comp=b"")), "legacy_compression_methods is empty"),
    (records(hello(GOOD, tail=b"\x00")), "bytes after the extensions"),
    (records(hello(GOOD, version=b"\x02\x00")), "not a TLS version"),
    (records(hello(ext(16, u16(3) + b"\x00ab"))), "an empty ALPN protocol name"),
    (records(hello(ext(16, u16(0)))), "protocol_name_list of 2 bytes or more"),
    (records(hello(GOOD)[:10]) + records(hello(GOOD)[10:], ctype=0x17), "non-handshake record"),
    (b"\x16\x03\x01\x00\x00", "zero-length"),
    (b"\x16\x03\x01\x40\x01" + bytes(10), "more than 2^14"),
    (records(hello(GOOD)[:10]) + records(hello(GOOD)[10:], version=b"\x03\x09"), "is not a TLS version"),
]


@pytest.mark.parametrize("data,reason", MALFORMED)
def test_each_broken_rule_is_malformed_with_its_reason(data, reason):
    got = inspect(data)
    assert got.state == "malformed" and reason in got.reason and got.stat == "tls_not_found", got


def test_hand_built_hellos_parse_with_and_without_extensions():
    assert inspect(records(hello(GOOD))).server_name == "a.example.com"
    assert inspect(records(hello(None))) == Inspection("tls", None, (), len(records(hello(None))))
    alpn = ext(16, u16(10) + b"\x02h2\x06spdy/3")
    assert inspect(records(hello(ext(0x2b, b"\x02\x03\x04") + alpn + GOOD))).alpn == ("h2", "spdy/3")


def test_a_hello_that_cannot_fit_the_limit_raises_too_large():
    big = hello(GOOD + ext(21, bytes(CLIENT_HELLO_MAX_BYTES)))   # padding extension past 16 KiB
    with pytest.raises(ClientHelloTooLarge) as err:
        inspect(records(big)[:9])                                  # decided from the declared length
    assert err.value.stat == "client_hello_too_large" and err.value.close
    # Many tiny records: the record headers count too, as Envoy counts every byte it peeks.
    small = hello(GOOD + ext(21, bytes(CLIENT_HELLO_MAX_BYTES // 2)))
    with pytest.raises(ClientHelloTooLarge):
        inspect(records(small, 1))
    assert inspect(records(small)).server_name == "a.example.com"


def test_the_limit_is_a_parameter():
    data = real_hello("a.example.com")
    assert inspect(data, max_bytes=len(data)).is_tls
    with pytest.raises(ClientHelloTooLarge):
        inspect(data, max_bytes=len(data) - 1)


# ---------------------------------------------------------------------------------------------
# Only our error escapes

REAL = real_hello("a.example.com", alpn=("h2",))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.integers(0, len(REAL)), st.integers(0, 255), st.booleans())
def test_junk_and_mutated_hellos_only_ever_answer_or_raise_our_error(junk, at, byte, mutate):
    data = REAL[:at] + bytes([byte]) + REAL[at + 1:] if mutate else b"\x16\x03" + junk
    for d in (data, junk, data[:at]):
        try:
            got = inspect(d, max_bytes=512)
        except TlsInspectError:
            continue
        assert got.state in ("tls", "not_tls", "malformed", "incomplete")
        if got.is_tls:
            assert 0 < got.length <= len(d) and (got.server_name is None or got.server_name.isascii())
