"""SPIFFE id parsing and formatting: ztunnel's shape, the SPIFFE character rules, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certs.errors import CertError
from certs.spiffe import SpiffeError, SpiffeId

ACCEPTED = [
    ("spiffe://cluster.local/ns/default/sa/bookinfo-productpage", ("cluster.local", "default", "bookinfo-productpage")),
    ("spiffe://td/ns//sa/", ("td", "", "")),  # ztunnel's own test: empty namespace and service account
    ("spiffe://td/ns/a/sa/", ("td", "a", "")),
    ("spiffe://td/ns//sa/b", ("td", "", "b")),
    ("spiffe://example.org/ns/ns/sa/sa", ("example.org", "ns", "sa")),
    ("spiffe://a_b-c.d/ns/N.x_Y-z/sa/S.1", ("a_b-c.d", "N.x_Y-z", "S.1")),
    ("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
     ("cluster.local", "istio-system", "istio-ingressgateway-service-account")),
]

REJECTED = [
    "spiffe://td/ns/a/sa/b/",  # trailing slash: ztunnel rejects (6 parts)
    "spiffe://td/ns/a/sa/b/c",  # extra segment
    "spiffe://td/ns/a/sa",  # missing sa value
    "spiffe://td/ns/a",
    "spiffe://td",
    "spiffe://",
    "",
    "spiffe://td/sa/b/ns/a",  # wrong order
    "spiffe://td/NS/a/sa/b",  # keywords are case-sensitive in ztunnel
    "spiffe://td/ns/a/SA/b",
    "spiffe://td/namespace/a/sa/b",
    "spiffe:/td/ns/a/sa/b",
    "SPIFFE://td/ns/a/sa/b",  # ztunnel's prefix check is case-sensitive
    "https://td/ns/a/sa/b",
    "td/ns/a/sa/b",  # a principal is not a SPIFFE id
    " spiffe://td/ns/a/sa/b",
    "spiffe://td/ns/a/sa/b ",
    "spiffe://td/ns/a/sa/b\n",
    "spiffe:///ns/a/sa/b",  # empty trust domain (SPIFFE-ID §2.1)
    "spiffe://TD/ns/a/sa/b",  # trust domains are lowercase (SPIFFE-ID §2.1)
    "spiffe://td:8080/ns/a/sa/b",  # no port
    "spiffe://user@td/ns/a/sa/b",  # no userinfo
    "spiffe://td/ns/a b/sa/c",
    "spiffe://td/ns/a%2Fb/sa/c",  # percent-encoding is not allowed (SPIFFE-ID §2.2)
    "spiffe://td/ns/./sa/c",  # dot segments (SPIFFE-ID §2.2)
    "spiffe://td/ns/../sa/c",
    "spiffe://td/ns/a/sa/b?x=1",
    "spiffe://td/ns/a/sa/b#f",
    "spiffe://tè/ns/a/sa/b",
    "spiffe://td/ns/ä/sa/b",
    "spiffe://td/ns/a\x00/sa/b",
    "spiffe://" + "a" * 256 + "/ns/a/sa/b",  # trust domain > 255
    "spiffe://td/ns/" + "a" * 2048 + "/sa/b",  # whole id > 2048 bytes
]


@pytest.mark.parametrize("uri,parts", ACCEPTED)
def test_parse_accepts_and_round_trips(uri, parts):
    sid = SpiffeId.parse(uri)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == parts
    assert str(sid) == uri
    assert sid.principal == uri[len("spiffe://"):]
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize("uri", REJECTED)
def test_parse_rejects(uri):
    with pytest.raises(SpiffeError) as info:
        SpiffeId.parse(uri)
    # a human message that shows (the start of) what was wrong
    assert str(info.value)
    assert isinstance(info.value, CertError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, b"spiffe://td/ns/a/sa/b", 42])
def test_parse_rejects_non_strings(value):
    with pytest.raises(SpiffeError, match="must be a string"):
        SpiffeId.parse(value)


def test_constructor_validates_like_parse():
    with pytest.raises(SpiffeError, match="trust domain"):
        SpiffeId("", "a", "b")
    with pytest.raises(SpiffeError, match="namespace"):
        SpiffeId("td", "a/b", "c")  # would format to an id that parses differently
    with pytest.raises(SpiffeError, match="service account"):
        SpiffeId("td", "a", "..")


def test_principal_format_and_value_semantics():
    a = SpiffeId("cluster.local", "default", "sleep")
    assert str(a) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert a.principal == "cluster.local/ns/default/sa/sleep"
    b = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert sorted([SpiffeId("td", "b", "a"), SpiffeId("td", "a", "z")]) == [SpiffeId("td", "a", "z"), SpiffeId("td", "b", "a")]
    with pytest.raises(AttributeError):
        a.namespace = "other"  # frozen


def test_error_message_is_truncated_for_huge_input():
    with pytest.raises(SpiffeError) as info:
        SpiffeId.parse("x" * 5000)
    assert len(str(info.value)) < 300


_SEGMENT = st.text(alphabet="abcXYZ019.-_/ %:é\x00", max_size=8)
_NEAR = st.builds(
    lambda td, ns, sa, kw1, kw2, tail: f"spiffe://{td}/{kw1}/{ns}/{kw2}/{sa}{tail}",
    _SEGMENT, _SEGMENT, _SEGMENT,
    st.sampled_from(["ns", "NS", "n", ""]), st.sampled_from(["sa", "SA", "s", ""]),
    st.sampled_from(["", "/", "/x", "?"]),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=64), _NEAR, st.binary(max_size=16).map(lambda b: "spiffe://" + b.decode("latin-1"))))
def test_parse_only_raises_spiffe_error(uri):
    try:
        sid = SpiffeId.parse(uri)
    except SpiffeError:
        return
    # whatever parses, formats back to exactly the input
    assert str(sid) == uri
    assert SpiffeId.parse(str(sid)) == sid
