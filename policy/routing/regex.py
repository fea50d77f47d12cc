"""Regular expressions in routing configuration, as Istio and Envoy run them: Google RE2.

Every user-written regex in routing config — VirtualService ``regex`` StringMatches (``uri``, ``scheme``,
``method``, ``authority``, ``headers``, ``withoutHeaders``, ``queryParams``), ``rewrite.uriRegexRewrite``,
and HTTPRoute ``RegularExpression`` path / header / query matches — is compiled here and nowhere else.

Why RE2 and not Python's ``re``:

- Safety. Envoy compiles them with RE2 ("designed to complete execution in linear time as well as limit the
  amount of memory used", envoy/type/matcher/v3/regex.proto). Python's ``re`` backtracks: a config regex
  such as ``(a+)+$`` on a header lets any client freeze the event loop with one crafted value. RE2 answers
  a 100 KB adversarial value in about 0.1 ms (PERF NOTE below).
- Compatibility. istiod rejects what Go's ``regexp`` (RE2 syntax) rejects — lookaround, backreferences,
  possessive and atomic groups, conditionals, ``\\Z`` — and Envoy matches with RE2 semantics: ``\\d``,
  ``\\w``, ``\\s``, ``\\b`` are ASCII-only, ``$`` is end of text. A config that loads here loads on Istio,
  and means the same.

What is checked at load time (each a ``RegexError`` whose message the parsers put after the field path):

1. Length at most ``ISTIO_MAX_REGEX_BYTES`` (1024) UTF-8 bytes — istiod
   ``pkg/config/validation validateStringRegexp``: "regex is too large, max length allowed is 1024"
   (Go ``len``, i.e. bytes). HTTPRoute values are bounded by their CRD's ``MaxLength`` instead
   (the parser passes it, in characters as Kubernetes counts them).
2. RE2 compiles it (Envoy ``CompiledGoogleReMatcher``: ``RE2(regex, RE2::Quiet)``, else the config is
   rejected with RE2's message) and Go would too: istiod runs ``regexp.Compile``, which is RE2 syntax
   except that Go has no ``\\C`` (any byte) and names groups with ``[A-Za-z0-9_]`` only, so those are
   refused here as istiod refuses them. An empty match regex is refused by the parsers (istiod: "regex
   string match should not be empty"), except in ``withoutHeaders``, which istiod does not validate.
3. RE2 program size at most ``ENVOY_MAX_PROGRAM_SIZE``: Envoy throws when ``ProgramSize()`` exceeds the
   runtime key ``re2.max_program_size.error_level`` (Envoy's default 100), and Istio's proxy bootstrap
   raises that key to 32768 (``pkg/bootstrap/config.go extractRuntimeFlags``:
   ``"re2.max_program_size.error_level": "32768"``; istiod's comment in validateStringRegexp: "we program
   Envoy to allow very large regexs to avoid NACKs").
4. A ``uriRegexRewrite.rewrite`` follows RE2's rewrite syntax (``check_rewrite``).

Inputs are matched as the bytes Envoy sees. The proxy decodes request bytes as latin-1
(``proxy/pipeline/http.py``), so ``s.encode("latin-1")`` gives back the wire bytes and RE2 reads them as
UTF-8, exactly as Envoy does (a config ``é`` matches a client's UTF-8 ``é``). A string that cannot be
latin-1 (it did not come off the wire: a test, a caller building views by hand) is UTF-8 encoded instead;
such a caller should pass text in the wire form (``policy/routing/model.py wire_form``:
``text.encode("utf-8").decode("latin-1")``), since a latin-1-representable ``é`` given as is reads as the
single byte 0xE9, as a latin-1 client would send it. Every other config string compared with a request or
sent on the wire (exact/prefix matches, rewrites, redirects, header operations) is kept in that wire form
next to its text (policy/routing/model.py, "Wire form").

PERF NOTE — cost per call (this 2-core box, google-re2 1.1.20251105, best of 5):
``.venv/bin/python -m timeit -s "from policy.routing.regex import compile_regex; r = compile_regex('/p/[0-9]+')"
"r.fullmatch('/p/12345')"``: 1.15 µs (Python ``re``'s fullmatch: 0.10 µs); the same with
``compile_regex('(a+)+$')`` against ``'a' * 100_000 + '!'``: 0.12–0.14 ms (Python ``re`` doubles its time per extra character: 0.1 s at 22, years at 100 000);
``replace_all`` of Envoy's documented rewrite (``^/service/([^/]+)(/.*)$`` → ``\\2/instance/\\1``): 5.1 µs.
The microsecond is paid only when routing is computed: the waypoint memoises route decisions per config
snapshot under everything they read (``proxy/pipeline/http.py plan_cached``), so it is once per distinct
(path, consulted headers) per snapshot, not per request. We stay on google-re2's public API for that reason
(its private ``_regexp.Match`` would save ~0.6 µs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re2

# istiod validateStringRegexp: "regex is too large, max length allowed is 1024" (Go len(): UTF-8 bytes).
ISTIO_MAX_REGEX_BYTES = 1024
# Istio's Envoy bootstrap runtime: re2.max_program_size.error_level = 32768 (pkg/bootstrap/config.go
# extractRuntimeFlags). Envoy itself defaults to 100 (source/common/common/regex.cc).
ENVOY_MAX_PROGRAM_SIZE = 32768
# RE2's own default memory budget for one compiled regex (RE2::Options max_mem, 8 MiB), which Envoy keeps;
# a regex that needs more fails to compile ("pattern too large - compile failed").
RE2_MAX_MEM_BYTES = 8 << 20

RE2_SYNTAX_URL = "https://github.com/google/re2/wiki/Syntax"


class RegexError(ValueError):
    """A regex istiod or Envoy would reject; the message says why."""


def _options(*, capture: bool) -> re2.Options:
    # Envoy: RE2(regex, RE2::Quiet) — RE2's defaults (UTF-8, leftmost-first, Perl classes) without logging.
    o = re2.Options()
    o.log_errors = False
    o.max_mem = RE2_MAX_MEM_BYTES
    o.never_capture = not capture
    return o


_CAPTURE = _options(capture=True)
# Matching needs no groups: Envoy calls RE2::FullMatch(value, regex) without arguments, which lets RE2 use
# its DFA. Compiling with never_capture gives google-re2 the same freedom (a 100 KB matching value: 2.5 ms
# with captures, 0.12 ms without).
_NO_CAPTURE = _options(capture=False)


def _message(e: BaseException) -> str:
    arg = e.args[0] if e.args else str(e)
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


_GO_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _go_rejects(source: str) -> str | None:
    """What Go's regexp (istiod's validator) rejects although RE2 compiles it: the ``\\C`` escape (Go has
    none), and a group name beyond ``[A-Za-z0-9_]`` (Go ``isValidCaptureName``; RE2 also takes Unicode
    letters). Text between ``\\Q`` and ``\\E`` is literal and a ``[...]`` class holds no groups in both, so
    both are skipped; anything else malformed is left to RE2's compiler, which rejects it."""
    i, n = 0, len(source)
    in_class = class_first = False
    while i < n:
        c = source[i]
        if c == "\\":
            nxt = source[i + 1] if i + 1 < n else ""
            if nxt == "C":
                return "invalid escape sequence: \\C (istiod's Go regexp has no \\C)"
            if nxt == "Q" and not in_class:
                end = source.find("\\E", i + 2)
                i = n if end == -1 else end + 2
                continue
            i += 2
            class_first = False
            continue
        if in_class:
            if source.startswith("[:", i) and (end := source.find(":]", i + 2)) != -1:
                i = end + 2                 # [:alpha:] inside a class
            else:
                if c == "]" and not class_first:
                    in_class = False
                i += 1
            class_first = False
            continue
        if c == "[":
            in_class = class_first = True
            i += 2 if source.startswith("[^", i) else 1   # "]" first in a class is a literal
            continue
        if c == "(" and (source.startswith("(?P<", i) or source.startswith("(?<", i)
                         and not source.startswith(("(?<=", "(?<!"), i)):
            start = i + (4 if source[i + 2] == "P" else 3)
            end = source.find(">", start)
            name = source[start:end] if end != -1 else ""
            if name and not set(name) <= _GO_NAME_CHARS:
                return f"invalid named capture: {source[i:end + 1]} (istiod's Go regexp allows [A-Za-z0-9_] names)"
        i += 1
    return None


def _wire(s: str) -> tuple[bytes, bool]:
    """The bytes Envoy would match: latin-1 for wire-decoded text (True), else UTF-8 (False)."""
    try:
        return s.encode("latin-1"), True
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass"), False


def _unwire(b: bytes, latin1: bool) -> str:
    if latin1:
        return b.decode("latin-1")
    try:
        return b.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace")


def _rune_len(data: bytes, p: int) -> int:
    """Bytes of the UTF-8 rune at ``p``, or 1 where RE2's chartorune would see a decoding error
    (bad lead or continuation byte, truncated, overlong, above U+10FFFF) — GlobalReplace then steps one byte."""
    c = data[p]
    if c < 0x80:
        return 1
    if 0xC0 <= c <= 0xDF:
        need, low = 2, 0x80
    elif 0xE0 <= c <= 0xEF:
        need, low = 3, 0x800
    elif 0xF0 <= c <= 0xF7:
        need, low = 4, 0x10000
    else:
        return 1
    if p + need > len(data):
        return 1
    value = c & (0x7F >> need)
    for k in range(1, need):
        b = data[p + k]
        if b & 0xC0 != 0x80:
            return 1
        value = (value << 6) | (b & 0x3F)
    if value < low or value > 0x10FFFF:
        return 1
    return need


def check_rewrite(rewrite: str, groups: int) -> str | None:
    """RE2::CheckRewriteString: ``\\0``–``\\9`` name groups, ``\\\\`` is a backslash, nothing else may follow a
    backslash, and no group beyond the regex's may be named. Envoy hands the substitution to
    RE2::GlobalReplace unchecked, where a bad escape silently truncates the rewrite (RE2::Rewrite stops)
    and a missing group leaves the path unchanged; istiod does not check it either, so the loader
    accepts such a rewrite (Regex.replace_all applies it as RE2 does) and reports this as a warning."""
    i, n = 0, len(rewrite)
    while i < n:
        if rewrite[i] != "\\":
            i += 1
            continue
        if i + 1 == n:
            return "'\\' not allowed at end of the rewrite"
        c = rewrite[i + 1]
        if c != "\\" and not ("0" <= c <= "9"):
            return f"'\\' must be followed by a digit or '\\', got '\\{c}' (RE2 rewrite syntax: \\1 names group 1)"
        i += 2
    max_group = _max_submatch(rewrite.encode("utf-8", "surrogatepass"))
    if max_group > groups:
        return f"rewrite names group \\{max_group}, but the regex has only {groups} capturing group(s)"
    return None


@dataclass(frozen=True, eq=False)
class Regex:
    """One compiled config regex. ``fullmatch`` is Envoy's StringMatcher ``safe_regex`` (RE2::FullMatch);
    ``replace_all`` is its ``regex_rewrite`` (RE2::GlobalReplace)."""

    source: str
    program_size: int
    groups: int
    _capture: Any = field(repr=False)
    _match: Any = field(repr=False)

    def fullmatch(self, s: str) -> bool:
        data, _ = _wire(s)
        return self._match.fullmatch(data) is not None

    def replace_all(self, s: str, rewrite: str) -> str:
        """RE2::GlobalReplace(&s, regex, rewrite): every non-overlapping match, left to right, replaced by
        ``rewrite`` with ``\\N`` the N-th group (``\\0`` the whole match) and ``\\\\`` a backslash; an
        empty match right after the previous match is skipped (one UTF-8 rune ahead). A rewrite that
        fails ``check_rewrite`` behaves as in RE2: naming a group the regex lacks replaces nothing
        (GlobalReplace's ``nvec > 1 + NumberOfCapturingGroups()`` check), and a bad escape ends each
        replacement where it stands (RE2::Rewrite stops and GlobalReplace ignores its result).

        Not google-re2's ``sub``: that one copies Python's ``re.sub`` (measured: ``\\0`` inserts a NUL,
        ``\\g<1>`` and ``\\n`` are expanded, and ``x*`` on ``abxd`` gives ``-a-b--d-`` where RE2 gives
        ``-a-b-d-``)."""
        data, latin1 = _wire(s)
        sub = rewrite.encode("utf-8", "surrogatepass")
        if _max_submatch(sub) > self.groups:
            return s
        out = bytearray()
        p, end, last_end, count = 0, len(data), -1, 0
        while p <= end:
            m = self._capture.search(data, p)
            if m is None:
                break
            ms, me = m.span()
            if p < ms:
                out += data[p:ms]
            if ms == last_end and ms == me:
                # "Disallow empty match at end of last match: skip ahead" (re2.cc GlobalReplace).
                if p < end:
                    step = _rune_len(data, p)
                    out += data[p:p + step]
                    p += step
                else:
                    p += 1
                continue
            _expand(out, sub, m)
            p = last_end = me
            count += 1
        if count == 0:
            return s
        if p < end:
            out += data[p:]
        return _unwire(bytes(out), latin1)


def _expand(out: bytearray, sub: bytes, m: Any) -> None:
    """RE2::Rewrite: ``\\N`` → group N (empty if it did not take part), ``\\\\`` → ``\\``, stop at any other escape."""
    i, n = 0, len(sub)
    while i < n:
        j = sub.find(b"\\", i)
        if j == -1:
            out += sub[i:]
            return
        out += sub[i:j]
        c = sub[j + 1] if j + 1 < n else -1
        if c == 0x5C:                        # "\\"
            out.append(0x5C)
        elif 0x30 <= c <= 0x39:              # replace_all has checked the group exists
            g = m.group(c - 0x30)
            if g:
                out += g
        else:
            return                           # RE2::Rewrite: "invalid rewrite pattern", output so far kept
        i = j + 2


def _max_submatch(sub: bytes) -> int:
    """RE2::MaxSubmatch: the highest \\N a rewrite names (-1 if none)."""
    best, i = -1, sub.find(b"\\")
    while i != -1 and i + 1 < len(sub):
        c = sub[i + 1]
        if 0x30 <= c <= 0x39:
            best = max(best, c - 0x30)
        i = sub.find(b"\\", i + 2)
    return best


def compile_regex(source: str, *, max_chars: int | None = None) -> Regex:
    """Compile a config regex as istiod validates it and Envoy loads it, or raise ``RegexError``.

    ``max_chars``: a CRD ``MaxLength`` (HTTPRoute values) used instead of istiod's 1024-byte limit."""
    try:
        encoded = source.encode("utf-8")
    except UnicodeEncodeError:
        raise RegexError("not valid UTF-8 (a lone surrogate)") from None
    if max_chars is None:
        if len(encoded) > ISTIO_MAX_REGEX_BYTES:
            raise RegexError(f"regex is too large, max length allowed is {ISTIO_MAX_REGEX_BYTES} bytes "
                             f"(istiod), got {len(encoded)}")
    elif len(source) > max_chars:
        raise RegexError(f"regex is too long, at most {max_chars} characters, got {len(source)}")
    go = _go_rejects(source)
    if go is not None:
        raise RegexError(f"{go}; Istio uses RE2 syntax ({RE2_SYNTAX_URL})")
    try:
        capture = re2.compile(encoded, _CAPTURE)
        match = re2.compile(encoded, _NO_CAPTURE)
    except re2.error as e:
        raise RegexError(f"{_message(e)}; Istio uses RE2 syntax ({RE2_SYNTAX_URL})") from None
    size = capture.programsize
    if size > ENVOY_MAX_PROGRAM_SIZE:
        raise RegexError(f"RE2 program size {size} > max program size {ENVOY_MAX_PROGRAM_SIZE} (Envoy "
                         "re2.max_program_size.error_level as Istio sets it); simplify the regex")
    return Regex(source, size, capture.groups, capture, match)
