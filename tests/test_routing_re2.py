"""Routing regexes are RE2, as in Istio and Envoy (policy/routing/regex.py): what istiod's validation
rejects is a ConfigError naming the field; matching is RE2's full match on the bytes Envoy sees (linear
time, ASCII-only \\d \\w \\s \\b); uriRegexRewrite is RE2::GlobalReplace with \\1 group references."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from policy.errors import ConfigError, Where
from policy.routing import NoRoute, parse_http_route, parse_virtual_service
from policy.routing.regex import (
    ENVOY_MAX_PROGRAM_SIZE, ISTIO_MAX_REGEX_BYTES, Regex, RegexError, check_rewrite, compile_regex,
)
from proxy.pipeline.http import request_view
from tests.test_routing import V1, V2, clusters, dest, route_of, two_rule_vs
from tests.test_routing_common import SUBSETS_DR, doc, dr, hr, req, table, vs

PARENT = [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}]
GW_V1 = "inbound-vip|9080|http|reviews-v1.default.svc.cluster.local"


def wire(method: str = "GET", target: str = "/", headers: dict[str, str] | None = None):
    """A request view built as the proxy builds it from the bytes a client sent (UTF-8 on the wire)."""
    hs = [(k.encode(), v.encode("utf-8")) for k, v in (headers or {}).items()]
    return request_view(method.encode(), target.encode("utf-8"), b"reviews:9080", hs, 9080)


def vs_error(match: dict | None = None, rewrite: dict | None = None) -> ConfigError:
    rule: dict = {"route": [{"destination": dest()}]}
    if match is not None:
        rule["match"] = [match]
    if rewrite is not None:
        rule["rewrite"] = rewrite
    with pytest.raises(ConfigError) as e:
        parse_virtual_service(doc("VirtualService", {"hosts": ["reviews"], "http": [rule]}), Where("vs.yaml", 2))
    return e.value


def gw_error(match: dict) -> ConfigError:
    spec = {"parentRefs": PARENT, "rules": [{"matches": [match], "backendRefs": [{"name": "reviews-v1", "port": 9080}]}]}
    with pytest.raises(ConfigError) as e:
        parse_http_route(doc("HTTPRoute", spec), Where("route.yaml", 1))
    return e.value


# ---------------------------------------------------------------------------------------------
# What istiod rejects (Go regexp = RE2 syntax) is a config error naming file, document, resource, field.

ISTIO_REJECTS = [
    ("(?=/api)/.*", "invalid perl operator: (?="),          # lookahead
    ("(?!/admin)/.*", "invalid perl operator: (?!"),        # negative lookahead
    ("(?<=/v)1", "invalid perl operator: (?<="),            # lookbehind
    ("(?<!x)y", "invalid perl operator: (?<!"),             # negative lookbehind
    (r"/(\w+)/\1", r"invalid escape sequence: \1"),         # backreference
    ("/a++", "bad repetition operator: ++"),                # possessive
    ("/(?>a+)b", "invalid perl operator: (?>"),             # atomic group
    ("(?(1)a|b)", "invalid perl operator: (?("),            # conditional
    (r"/end\Z", r"invalid escape sequence: \Z"),            # Python's end-of-string (RE2 spells it \z)
    (r"/\C", r"invalid escape sequence: \C"),               # RE2 has \C, Go (istiod) does not
    ("/(?P=name)", "invalid perl operator: (?P"),           # named backreference
    ("x{1001}", "invalid repetition size"),                 # RE2/Go repeat limit 1000
    ("/(?P<nom_é>x)", "invalid named capture"),             # Go names are [A-Za-z0-9_] (RE2 takes é)
    ("(unclosed", "missing ): (unclosed"),
]


@pytest.mark.parametrize("regex,problem", ISTIO_REJECTS)
def test_istio_rejected_syntax_in_a_uri_match_is_a_config_error_naming_the_field(regex, problem):
    e = vs_error({"uri": {"regex": regex}})
    assert e.path == "spec.http[0].match[0].uri.regex"
    assert problem in e.problem and "RE2 syntax" in e.problem
    assert str(e).startswith("vs.yaml: document 2 (VirtualService default/r): spec.http[0].match[0].uri.regex: "
                             "invalid regular expression: ")


@pytest.mark.parametrize("regex,value", [
    (r"/(?P<id>[0-9]+)", "/42"), (r"/(?<id>[0-9]+)", "/42"),           # both named-group spellings
    (r"\Q/a.b\E", "/a.b"), (r"[[:alpha:]]+", "abc"), (r"\pL+", "ñé"),  # quoting, POSIX and Unicode classes
    (r"(?i)/API", "/api"), (r"/a\z", "/a"), (r"/\x41", "/A"), (r"[(?P<é>]+", "(?P<é>"),
])
def test_what_istio_accepts_loads_and_matches(regex, value):
    assert compile_regex(regex).fullmatch(value.encode("utf-8").decode("latin-1")) is True   # as off the wire


@pytest.mark.parametrize("match,path", [
    ({"headers": {"x-user": {"regex": "(?=a)a"}}}, "spec.http[0].match[0].headers.x-user.regex"),
    ({"withoutHeaders": {"x-user": {"regex": "(a)\\1"}}}, "spec.http[0].match[0].withoutHeaders.x-user.regex"),
    ({"queryParams": {"id": {"regex": "a++"}}}, "spec.http[0].match[0].queryParams.id.regex"),
    ({"authority": {"regex": "(?<=x)y"}}, "spec.http[0].match[0].authority.regex"),
    ({"method": {"regex": "(?>GET)"}}, "spec.http[0].match[0].method.regex"),
    ({"scheme": {"regex": "http\\Z"}}, "spec.http[0].match[0].scheme.regex"),
])
def test_every_virtualservice_regex_field_is_validated_as_istio_does(match, path):
    e = vs_error(match)
    assert e.path == path and "invalid regular expression" in e.problem


def test_uri_regex_rewrite_match_is_validated_like_any_regex():
    e = vs_error({"uri": {"prefix": "/"}}, {"uriRegexRewrite": {"match": "^/(?=v1)(.*)$", "rewrite": "/\\1"}})
    assert e.path == "spec.http[0].rewrite.uriRegexRewrite.match" and "(?=" in e.problem


@pytest.mark.parametrize("match,path", [
    ({"path": {"type": "RegularExpression", "value": "/(?!admin).*"}}, "spec.rules[0].matches[0].path.value"),
    ({"headers": [{"type": "RegularExpression", "name": "x-user", "value": "(a)\\1"}]},
     "spec.rules[0].matches[0].headers[0].value"),
    ({"queryParams": [{"type": "RegularExpression", "name": "id", "value": "[0-9]++"}]},
     "spec.rules[0].matches[0].queryParams[0].value"),
])
def test_httproute_regular_expressions_are_re2_too(match, path):
    e = gw_error(match)
    assert e.path == path and "invalid regular expression" in e.problem
    assert str(e).startswith("route.yaml: document 1 (HTTPRoute default/r): ")


def test_an_empty_regex_is_rejected_where_istiod_rejects_it_and_is_presence_in_without_headers():
    # istiod validateStringMatchRegexp: "regex string match should not be empty" (uri, headers, queryParams ...).
    assert "should not be empty" in vs_error({"headers": {"x": {"regex": ""}}}).problem
    assert "should not be empty" in vs_error({"uri": {"regex": ""}}).problem
    # withoutHeaders is not validated by istiod; Istio translates an empty regex to present_match, negated.
    t = two_rule_vs({"withoutHeaders": {"x": {"regex": ""}}})
    assert clusters(route_of(t, req("/"))) == [V2]
    assert clusters(route_of(t, req("/", headers={"x": ""}))) == [V1]
    # Gateway API: HTTPHeaderMatch.Value has MinLength=1.
    assert "should not be empty" in gw_error(
        {"headers": [{"type": "RegularExpression", "name": "x", "value": ""}]}).problem


# ---------------------------------------------------------------------------------------------
# Size limits: istiod's 1024 bytes, Envoy's program size as Istio configures it.


def test_a_regex_longer_than_1024_bytes_is_rejected_as_istiod_does_counting_utf8_bytes():
    assert compile_regex("a" * ISTIO_MAX_REGEX_BYTES).source == "a" * 1024
    e = vs_error({"uri": {"regex": "a" * 1025}})
    assert e.path == "spec.http[0].match[0].uri.regex" and "max length allowed is 1024 bytes" in e.problem
    # 513 two-byte characters are 1026 bytes: Go's len() counts bytes.
    assert "max length allowed is 1024" in vs_error({"headers": {"x": {"regex": "é" * 513}}}).problem


def test_httproute_values_are_bounded_by_the_crd_max_length_instead():
    long_header = "a" * 2000          # HTTPHeaderMatch.Value MaxLength=4096: fine there, too long for a VS
    h = hr({"parentRefs": PARENT, "rules": [{"matches": [{"headers": [
        {"type": "RegularExpression", "name": "x", "value": long_header}]}],
        "backendRefs": [{"name": "reviews-v1", "port": 9080}]}]})
    assert h.rules[0].matches[0].headers[0].match.pattern.source == long_header
    assert "max length allowed is 1024" in vs_error({"headers": {"x": {"regex": long_header}}}).problem
    e = gw_error({"path": {"type": "RegularExpression", "value": "/" + "a" * 1024}})
    assert "at most 1024 characters" in e.problem


def test_a_regex_whose_re2_program_exceeds_envoys_limit_is_rejected():
    # Envoy: "regex '...' RE2 program size of N > max program size of 32768 set for the error level
    # threshold"; Istio sets re2.max_program_size.error_level to 32768. Five ".{1000}" are 25 bytes but
    # about 40 000 instructions (UTF-8 "." is several).
    big = ".{1000}" * 5
    assert len(big) < ISTIO_MAX_REGEX_BYTES
    with pytest.raises(RegexError, match="program size") as e:
        compile_regex(big)
    assert str(ENVOY_MAX_PROGRAM_SIZE) in str(e.value)
    assert compile_regex(".{1000}" * 4).program_size <= ENVOY_MAX_PROGRAM_SIZE
    err = vs_error({"uri": {"regex": big}})
    assert err.path == "spec.http[0].match[0].uri.regex" and "RE2 program size" in err.problem


# ---------------------------------------------------------------------------------------------
# Linear time: a pathological regex against a large adversarial value answers (no backtracking).


def test_catastrophic_backtracking_regex_on_a_100kb_header_is_a_quick_no_match():
    # Under Python's re, (a+)+$ against "aaa…a!" takes time exponential in the length: one such header
    # would stop the proxy. RE2 answers in linear time, so these calls return (and the test finishes).
    evil = "a" * 100_000 + "!"
    t = two_rule_vs({"headers": {"x-evil": {"regex": "(a+)+$"}}})
    assert clusters(route_of(t, req("/", headers={"x-evil": evil}))) == [V1]        # no match: next rule
    assert clusters(route_of(t, req("/", headers={"x-evil": "a" * 100_000}))) == [V2]
    assert compile_regex("(x+x+)+y").fullmatch("x" * 100_000) is False
    assert compile_regex("(.*a){20}").fullmatch("a" * 19 + "b" * 100_000) is False


def test_catastrophic_regex_on_a_long_path_and_query_param_and_httproute_header_answers_too():
    t = two_rule_vs({"uri": {"regex": "/(a|aa)+$"}})
    assert clusters(route_of(t, req("/" + "a" * 50_000 + "b"))) == [V1]
    t = two_rule_vs({"queryParams": {"q": {"regex": "(a*)*b"}}})
    assert clusters(route_of(t, req("/p?q=" + "a" * 50_000))) == [V1]
    rt = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"matches": [{"headers": [
        {"type": "RegularExpression", "name": "x", "value": "(a+)+$"}]}],
        "backendRefs": [{"name": "reviews-v1", "port": 9080}]}]})])
    assert clusters(route_of(rt, req("/", headers={"x": "a" * 100_000}))) == [GW_V1]
    assert isinstance(route_of(rt, req("/", headers={"x": "a" * 100_000 + "!"})), NoRoute)


# ---------------------------------------------------------------------------------------------
# RE2 semantics: full match, ASCII-only Perl classes, matching on the wire bytes.


@pytest.mark.parametrize("regex,value,hit", [
    ("a.c", "abc", True),
    ("a.c", "abcd", False),                   # full match, not search
    ("b", "abc", False),
    ("a|ab", "ab", True),                     # the whole value must match some alternative
    ("/p/[0-9]+", "/p/12/x", False),
    ("a$", "a\n", False),                     # RE2 $ is end of text (Python's $ also matches before "\n")
    ("(?i)jason", "JaSoN", True),             # RE2 flags
    ("(?s)a.b", "a\nb", True),
    ("a.b", "a\nb", False),                   # . excludes \n unless (?s)
    (r"a\z", "a", True),                      # RE2's end of text is \z
])
def test_regex_string_match_is_an_re2_full_match(regex, value, hit):
    t = two_rule_vs({"headers": {"x": {"regex": regex}}})
    assert clusters(route_of(t, req("/", headers={"x": value}))) == ([V2] if hit else [V1])


@pytest.mark.parametrize("regex,value,hit", [
    (r"\d+", "١٢٣", False),                   # ARABIC-INDIC digits: RE2's \d is [0-9]
    (r"\d+", "123", True),
    (r"\p{Nd}+", "١٢٣", True),                # Unicode classes are spelled \p{..} in RE2
    (r"\w+", "é", False),                     # \w is [0-9A-Za-z_]
    (r"\pL+", "é", True),
    (r"a\sb", "a\u00a0b", False),             # NO-BREAK SPACE is not \s in RE2 (it is in Python)
    (r"\bé", "é", False),                     # \b is an ASCII word boundary
    ("é", "é", True),                         # a UTF-8 literal matches the client's UTF-8 bytes
    (".", "é", True),                         # one rune, two bytes
    ("..", "é", False),
])
def test_perl_classes_are_ascii_and_values_are_matched_as_the_utf8_bytes_the_client_sent(regex, value, hit):
    t = two_rule_vs({"headers": {"x": {"regex": regex}}})
    assert clusters(route_of(t, wire(headers={"x": value}))) == ([V2] if hit else [V1])


def test_a_hand_built_view_with_unicode_text_is_matched_as_its_utf8():
    # Not from the wire (cannot be latin-1): encoded as UTF-8, so RE2's classes still apply to it.
    r = compile_regex(r"\d+")
    assert r.fullmatch("١٢٣") is False and r.fullmatch("123") is True
    assert compile_regex(r"\p{Nd}+").fullmatch("١٢٣") is True
    assert compile_regex("€+").fullmatch("€€") is True


def test_uri_regex_matches_the_path_without_the_query():
    t = two_rule_vs({"uri": {"regex": "/p/[0-9]+"}})
    assert clusters(route_of(t, req("/p/12?q=a"))) == [V2]
    assert clusters(route_of(t, req("/p/12a?q=1"))) == [V1]


def test_compiled_matches_are_re2_regex_objects_not_python_re():
    # Regression guard: a StringMatch must never carry a Python re.Pattern again.
    v = vs({"hosts": ["reviews"], "http": [{"match": [{"uri": {"regex": "/a"}, "headers": {"h": {"regex": "b"}},
                                                        "queryParams": {"q": {"regex": "c"}}}],
                                             "rewrite": {"uriRegexRewrite": {"match": "/(a)", "rewrite": "/\\1"}},
                                             "route": [{"destination": dest()}]}]})
    m = v.http[0].matches[0]
    for sm in (m.uri, m.headers[0][1], m.query_params[0][1]):
        assert isinstance(sm.pattern, Regex)
    assert isinstance(v.http[0].rewrite.regex, Regex)


# ---------------------------------------------------------------------------------------------
# uriRegexRewrite = Envoy regex_rewrite = RE2::GlobalReplace.


def rewrite_table(match: str, rewrite: str):
    return table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/"}}], "rewrite": {"uriRegexRewrite": {"match": match, "rewrite": rewrite}},
         "route": [{"destination": dest()}]}]})], [dr(SUBSETS_DR)])


@pytest.mark.parametrize("match,rewrite,path,out", [
    # Envoy's documented example (route_components.proto RegexMatchAndSubstitute).
    ("^/service/([^/]+)(/.*)$", "\\2/instance/\\1", "/service/foo/v1/api", "/v1/api/instance/foo"),
    ("^/rx/(.*)$", "/\\1", "/rx/a/b?q=1", "/a/b?q=1"),            # the query is kept, not rewritten
    ("one", "two", "/xxx/one/yyy/one/zzz", "/xxx/two/yyy/two/zzz"),  # every match (global)
    ("/v1/(.*)", "/v2/\\0", "/v1/a", "/v2//v1/a"),                  # \0 is the whole match (Python: NUL)
    ("(/x)(y)?", "\\1[\\2]", "/x", "/x[]"),                         # a group that did not take part is empty
    ("/a", "/\\\\", "/a", "/\\"),                                  # \\ is one backslash
    ("x*", "-", "/abxd", "-/-a-b-d-"),                              # no empty match right after a match
    ("^/nomatch", "/y", "/path", "/path"),
])
def test_uri_regex_rewrite_follows_re2_global_replace(match, rewrite, path, out):
    assert route_of(rewrite_table(match, rewrite), req(path)).path == out


def test_rewrite_output_is_utf8_on_the_wire():
    # A UTF-8 substitution lands on the wire as its UTF-8 bytes (the proxy re-encodes the view as latin-1).
    d = route_of(rewrite_table("^/old/(.*)$", "/café/\\1"), wire(target="/old/ü"))
    assert d.path.encode("latin-1") == "/café/ü".encode("utf-8")


# RE2's own table (re2/testing/re2_test.cc, "ReplaceTest", global column), as every RE2 binding repeats it.
RE2_GLOBAL_REPLACE = [
    ("(qu|[b-df-hj-np-tv-z]*)([a-z]+)", "\\2\\1ay", "the quick brown fox jumps over the lazy dogs.",
     "ethay ickquay ownbray oxfay umpsjay overay ethay azylay ogsday."),
    ("\\w+", "\\0-NOSPAM", "abcd.efghi@google.com", "abcd-NOSPAM.efghi-NOSPAM@google-NOSPAM.com-NOSPAM"),
    ("^", "(START)", "foo", "(START)foo"),
    ("^", "(START)", "", "(START)"),
    ("$", "(END)", "", "(END)"),
    ("b", "bb", "ababababab", "abbabbabbabbabb"),
    ("b", "bb", "bbbbbb", "bbbbbbbbbbbb"),
    ("b+", "bb", "bbbbbb", "bb"),
    ("b*", "bb", "bbbbbb", "bb"),
    ("b*", "bb", "aaaaa", "bbabbabbabbabbabb"),
    ("a.*a", "(\\0)", "aba\naba", "(aba)\n(aba)"),
]


@pytest.mark.parametrize("regex,rewrite,text,out", RE2_GLOBAL_REPLACE)
def test_replace_all_reproduces_re2s_global_replace_table(regex, rewrite, text, out):
    assert compile_regex(regex).replace_all(text, rewrite) == out


def test_an_empty_match_after_a_match_skips_one_utf8_rune_not_one_byte():
    # GlobalReplace in UTF-8 mode steps a whole rune, so a multi-byte character is never split.
    wire_text = "aéb".encode("utf-8").decode("latin-1")
    assert compile_regex("x*").replace_all(wire_text, "-").encode("latin-1").decode("utf-8") == "-a-é-b-"


def test_an_empty_rewrite_is_a_config_error():
    # istiod validateURIRegexRewrite: "UriRegexRewrite requires both Rewrite and Match fields".
    e = vs_error({"uri": {"prefix": "/"}}, {"uriRegexRewrite": {"match": "^/(a)/(b)$", "rewrite": ""}})
    assert e.path == "spec.http[0].rewrite.uriRegexRewrite.rewrite" and "non-empty" in e.problem


@pytest.mark.parametrize("rewrite,problem,out", [
    ("/\\g<1>", "must be followed by a digit", "/"),      # Python's named-group syntax: cut at \g
    ("/x\\2\\n/\\1", "must be followed by a digit", "/xb"),  # \2 applied, then RE2::Rewrite stops at \n
    ("/\\3", "only 2 capturing group(s)", "/a/b"),         # GlobalReplace replaces nothing
    ("/a\\", "not allowed at end", "/a"),
])
def test_a_rewrite_re2_would_not_apply_is_accepted_with_a_warning_and_applied_as_re2_does(rewrite, problem, out):
    # istiod does not check the rewrite string and Envoy hands it to RE2::GlobalReplace unchecked:
    # accepted (Istio), applied as RE2 applies it, and `config check` warns with the field path.
    spec = {"hosts": ["reviews"], "http": [{"match": [{"uri": {"prefix": "/"}}],
            "rewrite": {"uriRegexRewrite": {"match": "^/(a)/(b)$", "rewrite": rewrite}},
            "route": [{"destination": dest()}]}]}
    v = parse_virtual_service(doc("VirtualService", spec), Where("vs.yaml", 2))
    assert [w for w in v.warnings if w.startswith("spec.http[0].rewrite.uriRegexRewrite.rewrite:") and problem in w]
    assert v.http[0].rewrite.regex.replace_all("/a/b", rewrite) == out
    assert route_of(rewrite_table("^/(a)/(b)$", rewrite), req("/a/b")).path == out


def test_check_rewrite_accepts_what_re2_accepts():
    assert check_rewrite("\\2/instance/\\1", 2) is None
    assert check_rewrite("\\0 and \\\\ and plain", 0) is None
    assert check_rewrite("\\1", 0) is not None


# ---------------------------------------------------------------------------------------------
# Bad input never escapes as anything but our error; matching never raises.


@settings(max_examples=300, deadline=None)
@given(source=st.text(max_size=40))
def test_compile_only_raises_regex_error(source):
    try:
        r = compile_regex(source)
    except RegexError:
        return
    assert r.program_size <= ENVOY_MAX_PROGRAM_SIZE


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(["(a+)+$", "x*", "(.)(.)?", "[^/]+", "\\p{L}*", "é|.", ""]),
       value=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
       rewrite=st.sampled_from(["", "-", "\\0", "[\\1]", "\\\\", "é"]))
def test_fullmatch_and_replace_all_never_raise_on_any_text(source, value, rewrite):
    r = compile_regex(source)
    assert isinstance(r.fullmatch(value), bool)
    assert isinstance(r.replace_all(value, rewrite), str)


def test_a_lone_surrogate_in_a_config_regex_is_a_regex_error():
    with pytest.raises(RegexError, match="UTF-8"):
        compile_regex("\ud800")
