"""Base64url and JSON as Envoy's JWT code reads them (absl::WebSafeBase64Unescape; protobuf's JSON → Struct).

Both are bounded: every input here is attacker-controlled (a token) or config (a JWKS).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from types import MappingProxyType
from typing import Any

# protobuf's JSON parser (JsonStringToMessage into google.protobuf.Struct, which Envoy's Jwt::parseFromString
# uses) stops at a nesting depth of 100 (its default recursion limit); deeper is "an invalid JSON". We keep
# the same bound, which also keeps Python's own recursion well clear of its limit.
MAX_JSON_NESTING = 100

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(text: str) -> bytes | None:
    """absl::WebSafeBase64Unescape: the URL-safe alphabet, padding optional (but if present it must complete
    the last quantum), no other characters; None when it is not valid."""
    body = text.rstrip("=")
    pad = len(text) - len(body)
    if pad > 2 or not _B64URL.fullmatch(body) or len(body) % 4 == 1:
        return None
    if pad and (len(body) + pad) % 4:
        return None
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _reject_constant(name: str) -> Any:
    # JSON has no NaN/Infinity; Python's json accepts them, protobuf's parser does not.
    raise ValueError(f"not JSON: {name}")


def loads_object(data: bytes | str) -> dict | None:
    """A JSON object (protobuf Struct) or None: bad UTF-8, bad JSON, not an object, or nested deeper than
    MAX_JSON_NESTING. Never raises."""
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError, TypeError):
        return None
    if not isinstance(value, dict) or _depth_exceeds(value, MAX_JSON_NESTING):
        return None
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return False


def freeze(value: Any) -> Any:
    """A read-only copy of decoded JSON: objects → MappingProxyType, arrays → tuples (what the authz
    evaluator's claim lookups accept). Depth is bounded by MAX_JSON_NESTING, so recursion is safe."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value
