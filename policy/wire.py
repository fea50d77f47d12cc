"""Wire form: config text as the waypoint holds request bytes (shared by policy/routing and policy/authz).

The waypoint decodes what a client sent as latin-1, one str character per byte
(proxy/pipeline/http.py ``request_view``), and encodes what it sends back with latin-1. Config strings are
text (YAML). Envoy compares a config string's UTF-8 bytes with the request's bytes (StringMatcher on the
raw header value; RBAC's matchers on :authority, :method, :path and header values) and writes a config
value's UTF-8 bytes on the wire (headers_to_add, prefix_rewrite, host_rewrite_literal, path_redirect,
...): protobuf strings are UTF-8. So each config string that is matched against a request or sent is kept
twice by the models: as written (what views, `config check` and error messages show) and in its wire
form, which matching and the values handed to the pipeline use. Then http.py's ``.encode("latin-1")``
yields the UTF-8 bytes, and "é" in config matches a client's UTF-8 "é" (0xC3 0xA9) — never the latin-1
byte 0xE9, just as in Envoy. Regexes do the same conversion themselves (policy/routing/regex.py).
"""

from __future__ import annotations


def wire_form(text: str) -> str:
    """``text``'s UTF-8 bytes as a latin-1 str (one char per byte): ``"é"`` → ``"Ã©"``. ASCII is itself.
    A lone surrogate (which the parsers refuse) passes through as its CESU bytes rather than raise."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def opt_wire_form(text: str | None) -> str | None:
    return None if text is None else wire_form(text)


ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(s: str) -> str:
    """A-Z → a-z and nothing else, as Envoy folds case: ``ignore_case`` matches are absl::EqualsIgnoreCase
    / StartsWithIgnoreCase / EndsWithIgnoreCase and header names absl::AsciiStrToLower, all ASCII-only.
    ``str.lower`` would also fold the latin-1 chars a UTF-8 byte decodes to (0xC3 "Ã" → 0xE3 "ã"), a
    different byte."""
    return s.lower() if s.isascii() else s.translate(ASCII_LOWER)
