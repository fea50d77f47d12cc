"""Read ``security.istio.io`` v1/v1beta1 AuthorizationPolicy documents and ztunnel-format inventory
``policies:`` entries into the one model (policy/authz/model.py).

Fail closed: an unknown field anywhere is an error, and so is everything Istio's admission webhook
rejects (``pkg/config/validation/validation.go ValidateAuthorizationPolicy``,
``pkg/config/security/security.go``): a user who could not ``kubectl apply`` a policy must not find it
half-enforced here. In particular an unknown ``when`` key, a bad IP or port string and a bad path
template are load errors, not the "skipped invalid rule" / "ignored value" that istiod falls back
to for policies that bypassed validation (§1.7) — those fallbacks make a DENY *weaker*, which a file
loaded proxy has no reason to risk. What is valid but surprising goes to ``policy.warnings``.
"""

from __future__ import annotations

import difflib
from types import MappingProxyType
from typing import Any, Callable

from policy.authz import model as m
from policy.authz.match import Cidr, HeaderMatch, StringMatch, check_path_template, parse_path_match
from policy.errors import ConfigError, Where
from policy.wire import ascii_lower, wire_form

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KIND = "AuthorizationPolicy"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
DEFAULT_NAMESPACE = "default"  # kubectl's namespace for a manifest without metadata.namespace

# Limits from the CRD schema (istio/api security/v1beta1/authorization_policy.proto, +kubebuilder).
MAX_RULES = 512
MAX_TARGET_REFS = 16
MAX_SERVICE_ACCOUNTS = 16          # security.go CheckServiceAccount: "may not have more than 16 values"
MAX_SERVICE_ACCOUNT_CHARS = 320    # ibid.: "value cannot exceed 320 characters"

# Kubernetes ObjectMeta fields a manifest (or `kubectl get -o yaml`) may carry.
OBJECT_META_FIELDS = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
    "ownerReferences", "finalizers", "generateName", "selfLink",
})
TOP_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
SPEC_FIELDS = frozenset({"selector", "targetRef", "targetRefs", "action", "provider", "rules"})
RULE_FIELDS = frozenset({"from", "to", "when"})
SOURCE_FIELDS = (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
    "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
    "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains",
)
OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
CONDITION_FIELDS = frozenset({"key", "values", "notValues"})
TARGET_REF_FIELDS = frozenset({"group", "kind", "name", "namespace"})

# validation.go allowedTargetRefs: (kind, canonical group)
ALLOWED_TARGET_REFS = frozenset({
    ("Service", "core"),
    ("ServiceEntry", "networking.istio.io"),
    ("Gateway", "gateway.networking.k8s.io"),
    ("GatewayClass", "gateway.networking.k8s.io"),
})

# Go strconv.ParseBool, which Istio uses for the dry-run annotation (authz model IsDryRunPolicy).
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


# ---- small strict readers -----------------------------------------------------------------------

class _Reader:
    def __init__(self, where: Where):
        self.where = where

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.where, path, problem)

    def mapping(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(path, f"expected string keys, got {_kind(k)} {k!r}")
        return value

    def fields(self, value: Any, path: str, allowed) -> dict:
        d = self.mapping(value, path)
        for k in d:
            if k not in allowed:
                hint = difflib.get_close_matches(k, sorted(allowed), n=1)
                raise self.fail(_join(path, k), "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return d

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_kind(value)}")
        return value

    def strings(self, value: Any, path: str, *, hint: str = "") -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "expected a list of strings" + hint)
        for i, v in enumerate(value):
            if v == "":
                # security.go CheckEmptyValues: "empty value not allowed"
                raise self.fail(f"{path}[{i}]", "empty value not allowed")
        return value

    def list(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_kind(value)}")
        return value


# What an error says a wrong value is, checked in this order (bool first: a bool is an int in Python).
_KIND_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "a mapping"))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _KIND_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- value parsers (each raises ValueError with a human message) --------------------------------

def _parse_cidr(text: str) -> m.IpMatch:
    try:
        return m.IpMatch(Cidr.parse(text))
    except ValueError:
        kind = "CIDR range" if "/" in text else "IP address"
        raise ValueError(f"bad {kind} {text!r}") from None


def _parse_port(text: str) -> m.PortMatch:
    # security.go ValidatePorts: strconv.ParseUint(port, 10, 32), then p > 65535 is an error.
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(f"bad port {text!r}: expected a number 0-65535")
    return m.PortMatch(int(text))


def _service_account_parser(policy_ns: str) -> Callable[[str], m.ServiceAccountMatch]:
    def parse(text: str) -> m.ServiceAccountMatch:
        # security.go CheckServiceAccount
        if "*" in text:
            raise ValueError(f"wildcard not allowed in {text!r}")
        if len(text) > MAX_SERVICE_ACCOUNT_CHARS:
            raise ValueError(f"value cannot exceed {MAX_SERVICE_ACCOUNT_CHARS} characters")
        parts = text.split("/")
        if len(parts) > 2 or any(p == "" for p in parts):
            raise ValueError(f"expected 'serviceAccount' or 'namespace/serviceAccount', found {text!r}")
        if len(parts) == 1:
            # Istio: a bare name is a service account in the policy's namespace.
            return m.ServiceAccountMatch(policy_ns, parts[0])
        return m.ServiceAccountMatch(parts[0], parts[1])
    return parse


def _parse_string(text: str) -> StringMatch:
    return StringMatch.parse(text)


def _parse_host(text: str) -> StringMatch:
    # Envoy HostMatcher with ignoreCase (istio-semantics §1.1 hosts); the port, if any, is part of it.
    # Istio matcher/header.go HostMatcher: a header matcher on ":authority" with IgnoreCase: true — Envoy
    # compares the config string's UTF-8 bytes with the :authority bytes, folding ASCII only.
    return StringMatch.parse(text, ignore_case=True, on_wire=True)


def _parse_method(text: str) -> StringMatch:
    # Istio matcher/header.go: HeaderMatcher(":method", value) — the :method bytes, case-sensitive.
    return StringMatch.parse(text, on_wire=True)


def _parse_header_value(text: str) -> StringMatch:
    # Istio `request.headers[name]`: HeaderMatcher(name, value) — Envoy's StringMatcher over the header's
    # bytes (repeated headers joined with ","), so the config value's UTF-8 bytes.
    return HeaderMatch.parse(text, on_wire=True)


def _parse_path(text: str):
    problem = check_path_template(text)
    if problem:
        raise ValueError(problem)
    return parse_path_match(text)


# ---- Istio AuthorizationPolicy -------------------------------------------------------------------

# source field (positive name) → (attribute, value parser factory, ztunnel treatment)
def _source_table(policy_ns: str):
    return {
        "principals": (m.A_SOURCE_PRINCIPAL, _parse_string, m.ZT_L4),
        "requestPrincipals": (m.A_REQUEST_PRINCIPAL, _parse_string, m.ZT_L7),
        "namespaces": (m.A_SOURCE_NAMESPACE, _parse_string, m.ZT_L4),
        "ipBlocks": (m.A_SOURCE_IP, _parse_cidr, m.ZT_L4),
        "remoteIpBlocks": (m.A_REMOTE_IP, _parse_cidr, m.ZT_L7),   # ztunnel: httpSources
        "serviceAccounts": (m.A_SOURCE_SERVICE_ACCOUNT, _service_account_parser(policy_ns), m.ZT_L4),
        "trustDomains": (m.A_SOURCE_TRUST_DOMAIN, _parse_string, m.ZT_IGNORED),  # not mapped by handleRule
    }


OPERATION_TABLE = {
    "hosts": (m.A_HOST, _parse_host, m.ZT_L7),
    "ports": (m.A_DESTINATION_PORT, _parse_port, m.ZT_L4),
    "methods": (m.A_METHOD, _parse_method, m.ZT_L7),   # case-sensitive: HeaderMatcher(":method") has no ignoreCase
    "paths": (m.A_PATH, _parse_path, m.ZT_L7),
}


def _not(name: str) -> str:
    return "not" + name[0].upper() + name[1:]


class _PolicyParser(_Reader):
    def __init__(self, where: Where, namespace: str):
        super().__init__(where)
        self.namespace = namespace
        self.warnings: list[str] = []

    def values(self, raw: Any, path: str, parse, *, hint: str = "") -> tuple:
        out = []
        for i, text in enumerate(self.strings(raw, path, hint=hint)):
            try:
                out.append(parse(text))
            except ValueError as e:
                raise self.fail(f"{path}[{i}]", str(e)) from None
        return tuple(out)

    def match_fields(self, body: dict, path: str, table: dict) -> tuple[m.Field, ...]:
        fields = []
        for name, (attr, parse, zt) in table.items():
            pos, neg = body.get(name), body.get(_not(name))
            if pos is None and neg is None:
                continue
            hint = ' (write ports as strings, e.g. "8080")' if name == "ports" else ""
            values = self.values(pos, _join(path, name), parse, hint=hint) if pos is not None else ()
            not_values = self.values(neg, _join(path, _not(name)), parse, hint=hint) if neg is not None else ()
            if name == "serviceAccounts":
                for key, vals in ((name, values), (_not(name), not_values)):
                    if len(vals) > MAX_SERVICE_ACCOUNTS:
                        raise self.fail(_join(path, key), f"may not have more than {MAX_SERVICE_ACCOUNTS} values")
            if name == "principals":
                for key, raw in ((name, pos or ()), (_not(name), neg or ())):
                    for i, text in enumerate(raw):
                        if text.startswith("spiffe://"):
                            self.warnings.append(
                                f"{path}.{key}[{i}]: {text!r} starts with spiffe://; Istio matches principals "
                                f"without it (\"cluster.local/ns/default/sa/x\"), so this never matches")
            if not values and not not_values:
                continue  # `principals: []` is as good as absent (proto3 has no empty-vs-unset for lists)
            fields.append(m.Field(attr, name, values, not_values,
                                  envoy_http_only=attr in m.ENVOY_HTTP_ONLY, ztunnel=zt))
        return tuple(fields)

    def source(self, raw: Any, path: str, rule_i: int) -> m.Source:
        body = self.fields(raw, path, frozenset(SOURCE_FIELDS))
        if ({"principals", "notPrincipals", "namespaces", "notNamespaces"} & _set_keys(body)
                and {"serviceAccounts", "notServiceAccounts"} & _set_keys(body)):
            # CEL rule / validation.go: "cannot set serviceAccounts with namespaces or principals"
            raise self.fail(path, "cannot set serviceAccounts with namespaces or principals")
        fields = self.match_fields(body, path, _source_table(self.namespace))
        if not _set_keys(body):
            raise self.fail(path, f"`from.source` must not be empty, found at rule {rule_i}")
        return m.Source(fields)

    def operation(self, raw: Any, path: str, rule_i: int) -> m.Operation:
        body = self.fields(raw, path, frozenset(OPERATION_FIELDS))
        fields = self.match_fields(body, path, OPERATION_TABLE)
        if not _set_keys(body):
            raise self.fail(path, f"`to.operation` must not be empty, found at rule {rule_i}")
        return m.Operation(fields)

    def condition(self, raw: Any, path: str) -> m.Condition:
        body = self.fields(raw, path, CONDITION_FIELDS)
        if "key" not in body:
            raise self.fail(_join(path, "key"), "required field missing")
        key = self.string(body["key"], _join(path, "key"))
        if key == "":
            raise self.fail(_join(path, "key"), "`key` must not be empty")
        values_raw, not_raw = body.get("values"), body.get("notValues")
        if not values_raw and not not_raw:
            if values_raw is not None:
                self.strings(values_raw, _join(path, "values"))
            if not_raw is not None:
                self.strings(not_raw, _join(path, "notValues"))
            raise self.fail(path, f"at least one of `values` or `notValues` must be set for key {key}")
        attr, arg, parse, zt = self.condition_key(key, _join(path, "key"))
        values = self.values(values_raw, _join(path, "values"), parse) if values_raw is not None else ()
        not_values = self.values(not_raw, _join(path, "notValues"), parse) if not_raw is not None else ()
        if attr == m.A_SOURCE_SERVICE_ACCOUNT:
            for k, vals in (("values", values), ("notValues", not_values)):
                if len(vals) > MAX_SERVICE_ACCOUNTS:
                    raise self.fail(_join(path, k), f"may not have more than {MAX_SERVICE_ACCOUNTS} values")
        return m.Condition((m.Field(attr, key, values, not_values, arg,
                                    envoy_http_only=attr in m.ENVOY_HTTP_ONLY, ztunnel=zt),))

    def condition_key(self, key: str, path: str):
        """security.go ValidateAttribute, mapped onto our attributes."""
        def l4(attr):
            return m.ZT_L4 if attr in m.ZTUNNEL_L4_WHEN_KEYS else m.ZT_L7

        simple = {
            m.A_SOURCE_IP: _parse_cidr,
            m.A_REMOTE_IP: _parse_cidr,
            m.A_SOURCE_NAMESPACE: _parse_string,
            m.A_SOURCE_PRINCIPAL: _parse_string,
            m.A_SOURCE_SERVICE_ACCOUNT: _service_account_parser(self.namespace),
            m.A_SOURCE_TRUST_DOMAIN: _parse_string,
            m.A_REQUEST_PRINCIPAL: _parse_string,
            m.A_REQUEST_AUDIENCES: _parse_string,
            m.A_REQUEST_PRESENTER: _parse_string,
            m.A_DESTINATION_IP: _parse_cidr,
            m.A_DESTINATION_PORT: _parse_port,
            m.A_SNI: _parse_string,
        }
        if key in simple:
            return key, (), simple[key], l4(key)
        if key.startswith("request.experimental.inline.headers") or key.startswith("experimental.envoy.filters."):
            raise self.fail(path, f"condition key {key!r} reads Envoy-internal state that hbone-proxy does not "
                                  "have; it is not supported")
        for prefix, attr in ((m.A_REQUEST_HEADER, m.A_REQUEST_HEADER), (m.A_REQUEST_CLAIMS, m.A_REQUEST_CLAIMS)):
            if key.startswith(prefix):
                rest = key[len(prefix):]
                # security.go validateMapKey: "should have format a[b]"
                if not (rest.startswith("[") and rest.endswith("]") and len(rest) > 2):
                    raise self.fail(path, f"bad key {key!r}: should have format {prefix}[name]")
                inner = rest[1:-1]
                if attr == m.A_REQUEST_HEADER:
                    if "[" in inner or "]" in inner:
                        raise self.fail(path, f"bad key {key!r}: should have format {prefix}[name]")
                    # HTTP header names are case-insensitive; our request headers are lowercase (ASCII
                    # only, as Envoy's LowerCaseString) and, like their values, in wire form.
                    return attr, (ascii_lower(wire_form(inner)),), _parse_header_value, m.ZT_L7
                claim_path = tuple(inner.split("]["))
                if any(p == "" or "[" in p or "]" in p for p in claim_path):
                    raise self.fail(path, f"bad key {key!r}: should have format {prefix}[claim] or [a][b]")
                return attr, claim_path, _parse_string, m.ZT_L7
        if key == "destination.namespace":
            raise self.fail(path, f"attribute {key} is replaced by the metadata.namespace")
        if key.startswith("destination.labels"):
            raise self.fail(path, f"attribute {key} is replaced by the workload selector")
        if key in ("destination.name", "destination.user"):
            raise self.fail(path, f"deprecated attribute {key}: only supported in v1alpha1")
        hint = difflib.get_close_matches(key, sorted(simple) + ["request.headers[]", "request.auth.claims[]"], n=1)
        raise self.fail(path, f"unknown attribute: {key}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    def clause(self, raw: Any, path: str, index: int, key: str, field: str,
               parse: Callable[[Any, str, int], Any]) -> m.Clause:
        """A rule's ``from`` (items ``{source: ...}``) or ``to`` (items ``{operation: ...}``): a
        non-empty list whose every item holds its one field, as Istio's validation requires."""
        items = self.list(raw, _join(path, key))
        if not items:
            raise self.fail(_join(path, key), f"`{key}` must not be empty, found at rule {index}")
        parsed = []
        for i, item in enumerate(items):
            ipath = f"{path}.{key}[{i}]"
            item = self.fields(item, ipath, frozenset({field}))
            if item.get(field) is None:
                raise self.fail(_join(ipath, field), f"`{key}.{field}` must not be nil, found at rule {index}")
            parsed.append(parse(item[field], _join(ipath, field), index))
        return m.Clause(key, tuple(parsed))

    def rule(self, raw: Any, path: str, index: int) -> m.Rule:
        body = self.fields(raw, path, RULE_FIELDS)
        clauses = []
        if body.get("from") is not None:
            clauses.append(self.clause(body["from"], path, index, "from", "source", self.source))
        if body.get("to") is not None:
            clauses.append(self.clause(body["to"], path, index, "to", "operation", self.operation))
        if body.get("when") is not None:
            for i, item in enumerate(self.list(body["when"], _join(path, "when"))):
                clauses.append(m.Clause(f"when[{i}]", (self.condition(item, f"{path}.when[{i}]"),)))
        return m.Rule(index, tuple(clauses))


def read_target_ref(r, raw: Any, path: str) -> m.TargetRef:
    """One ``targetRef`` / ``targetRefs[i]`` of a ``security.istio.io`` policy (AuthorizationPolicy here,
    RequestAuthentication in policy/authn/parse.py), as Istio's webhook checks it. ``r``: the caller's reader
    (``fields``, ``string``, ``fail``, ``warnings``)."""
    body = r.fields(raw, path, TARGET_REF_FIELDS)
    for req in ("kind", "name"):
        if req not in body:
            raise r.fail(_join(path, req), "required field missing")
    group = r.string(body.get("group", ""), _join(path, "group"))
    kind = r.string(body["kind"], _join(path, "kind"))
    name = r.string(body["name"], _join(path, "name"))
    if name == "":
        raise r.fail(_join(path, "name"), "targetRef name must be set")
    if body.get("namespace") not in (None, ""):
        r.string(body["namespace"], _join(path, "namespace"))
        raise r.fail(_join(path, "namespace"),
                     "targetRef namespace must not be set; cross namespace referencing is not supported")
    ref = m.TargetRef(group, kind, name)
    if (kind, ref.canonical_group) not in ALLOWED_TARGET_REFS:
        allowed = ", ".join(sorted(f"{g}/{k}" for k, g in ALLOWED_TARGET_REFS))
        raise r.fail(path, f"targetRef must be to one of {allowed} but was {group or 'core'}/{kind}")
    if kind == "ServiceEntry":
        r.warnings.append(f"{path}: ServiceEntry targets are accepted but hbone-proxy attaches policies only to a "
                          "Service or the waypoint's Gateway, so this reference never attaches")
    return ref


def read_attachment(r, spec: dict) -> tuple[MappingProxyType | None, list[m.TargetRef]]:
    """What a ``security.istio.io`` policy attaches to (AuthorizationPolicy here, RequestAuthentication in
    policy/authn/parse.py): its ``selector`` labels (None when unset) and its ``targetRefs`` (or the legacy
    ``targetRef``), at most one of them, as Istio's webhook checks them. ``r``: the caller's reader."""
    selector = None
    if spec.get("selector") is not None:
        sel = r.fields(spec["selector"], "spec.selector", frozenset({"matchLabels"}))
        labels = r.mapping(sel.get("matchLabels") or {}, "spec.selector.matchLabels")
        for k, v in labels.items():
            lp = f"spec.selector.matchLabels[{k}]"
            r.string(v, lp)
            if k == "":
                raise r.fail(lp, "empty key is not supported in selector")
            if "*" in k or "*" in v:
                raise r.fail(lp, f"wildcard is not supported in selector: {k}={v}")
        selector = MappingProxyType(dict(labels))
    refs: list[m.TargetRef] = []
    if spec.get("targetRefs") is not None:
        raw_refs = _Reader.list(r, spec["targetRefs"], "spec.targetRefs")
        if len(raw_refs) > MAX_TARGET_REFS:
            raise r.fail("spec.targetRefs", f"may not have more than {MAX_TARGET_REFS} items")
        refs = [read_target_ref(r, x, f"spec.targetRefs[{i}]") for i, x in enumerate(raw_refs)]
    legacy = read_target_ref(r, spec["targetRef"], "spec.targetRef") if spec.get("targetRef") is not None else None
    if (selector is not None) + (legacy is not None) + bool(refs) > 1:
        # validation.go validateOneOfSelectorType
        raise r.fail("spec", "only one of targetRefs or selector can be set")
    if legacy is not None:
        refs = [legacy]  # policyattachment.go GetTargetRefs: targetRef is used only if targetRefs is empty
    return selector, refs


def _set_keys(body: dict) -> set[str]:
    """Keys whose value is present and non-empty (proto3: an empty list is the same as unset)."""
    return {k for k, v in body.items() if v not in (None, [], {})}


def _best_effort_name(meta: Any) -> str:
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return ""
    ns = meta.get("namespace", DEFAULT_NAMESPACE)
    return f"{ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE}/{meta['name']}"


def security_envelope(r, doc: dict, kind: str) -> tuple[dict, dict, str, str]:
    """The checks every ``security.istio.io`` document gets before its spec (AuthorizationPolicy here,
    RequestAuthentication in policy/authn/parse.py): known top-level fields, the apiVersion and kind, and a
    non-empty metadata name and namespace. ``r``: the caller's reader (``fields``, ``fail``, ``string``).
    Returns (document, metadata, name, namespace)."""
    doc = r.fields(doc, "", TOP_FIELDS)
    api = doc.get("apiVersion")
    if api not in API_VERSIONS:
        raise r.fail("apiVersion", f"expected one of {', '.join(API_VERSIONS)}, got {api!r}")
    if doc.get("kind") != kind:
        raise r.fail("kind", f"expected {kind!r}, got {doc.get('kind')!r}")
    meta = r.fields(doc.get("metadata"), "metadata", OBJECT_META_FIELDS)
    if "name" not in meta:
        raise r.fail("metadata.name", "required field missing")
    name = r.string(meta["name"], "metadata.name")
    namespace = r.string(meta.get("namespace", DEFAULT_NAMESPACE), "metadata.namespace")
    if name == "" or namespace == "":
        raise r.fail("metadata.name" if name == "" else "metadata.namespace", "must not be empty")
    return doc, meta, name, namespace


def parse_authorization_policy(doc: dict, where: Where) -> m.AuthorizationPolicy:
    """One whole ``security.istio.io`` AuthorizationPolicy document → the model, or ConfigError."""
    if not where.name and isinstance(doc, dict):
        # Name the resource in every message as soon as it can be named, even before it validates.
        where = where.with_resource(where.kind or (doc.get("kind") if isinstance(doc.get("kind"), str) else KIND),
                                    _best_effort_name(doc.get("metadata")))
    r = _Reader(where)
    doc, meta, name, namespace = security_envelope(r, doc, KIND)
    p = _PolicyParser(where, namespace)

    dry_run = False
    annotations = meta.get("annotations")
    if annotations is not None:
        annotations = p.mapping(annotations, "metadata.annotations")
        if DRY_RUN_ANNOTATION in annotations:
            val = annotations[DRY_RUN_ANNOTATION]
            path = f"metadata.annotations[{DRY_RUN_ANNOTATION}]"
            p.string(val, path)
            if val in _GO_TRUE:
                dry_run = True
            elif val not in _GO_FALSE:
                # Istio (strconv.ParseBool fails) logs and enforces the policy: so do we, loudly.
                p.warnings.append(f"{path}: {val!r} is not a boolean; the policy is enforced (not dry-run)")
    for key in ("labels", "annotations"):
        if meta.get(key) is not None:
            for k, v in p.mapping(meta[key], f"metadata.{key}").items():
                p.string(v, f"metadata.{key}[{k}]")

    spec = p.fields(doc.get("spec", {}) if doc.get("spec") is not None else {}, "spec", SPEC_FIELDS)

    action = spec.get("action", m.ALLOW)
    p.string(action, "spec.action")
    custom = action == CUSTOM
    if custom:
        action = _custom_as_deny(p, spec)
    if action not in m.ACTIONS:
        raise p.fail("spec.action", f"expected one of ALLOW, DENY, AUDIT, CUSTOM, got {action!r}")
    if spec.get("provider") is not None and not custom:
        p.mapping(spec["provider"], "spec.provider")
        raise p.fail("spec.provider", f"`provider` must not be with non CUSTOM action, found {action}")

    selector, refs = read_attachment(p, spec)
    if selector is not None and not selector:
        p.warnings.append("spec.selector: workload selector specified without labels (selects every "
                          "workload in the namespace)")

    rules_raw = spec.get("rules")
    rules: list[m.Rule] = []
    if rules_raw is not None:
        rules_list = p.list(rules_raw, "spec.rules")
        if len(rules_list) > MAX_RULES:
            raise p.fail("spec.rules", f"may not have more than {MAX_RULES} items")
        rules = [p.rule(x if x is not None else {}, f"spec.rules[{i}]", i) for i, x in enumerate(rules_list)]
    if action == m.DENY and not rules:
        # Istio's webhook (validation.go) only WARNS here — the policy is accepted and, with no rules,
        # never matches: "DENY with no rules does nothing" (istio-semantics §6 item 1).
        p.warnings.append("spec.rules: DENY action without `rules` is meaningless as it will never be triggered, "
                          "add an empty rule `{}` if you want it be triggered for every request")

    if action == m.DENY and not custom:
        _warn_http_only_deny(p, rules)
    return m.AuthorizationPolicy(
        namespace=namespace, name=name, action=action, selector=selector, target_refs=tuple(refs),
        rules=tuple(rules), dry_run=dry_run, origin=m.ORIGIN_ISTIO, warnings=tuple(p.warnings),
    )


CUSTOM = "CUSTOM"
# istiod validation.go, CUSTOM action: "%s is currently not supported with CUSTOM action" for these source fields
# and `when` keys (the ext_authz check request cannot carry them).
_CUSTOM_UNSUPPORTED_SOURCE = (("namespaces", "From.Namespaces"), ("notNamespaces", "From.NotNamespaces"),
                              ("serviceAccounts", "From.ServiceAccounts"),
                              ("notServiceAccounts", "From.NotServiceAccounts"), ("principals", "From.Principals"),
                              ("notPrincipals", "From.NotPrincipals"), ("requestPrincipals", "From.RequestPrincipals"),
                              ("notRequestPrincipals", "From.NotRequestPrincipals"))
_CUSTOM_UNSUPPORTED_WHEN = ("source.namespace", "source.serviceAccount", "source.principal")


def _custom_as_deny(p: _PolicyParser, spec: dict) -> str:
    """A CUSTOM policy: checked as istiod's webhook checks one, then enforced as istiod configures a waypoint
    whose extension provider is not configured — hbone-proxy has no ext_authz client, so no provider is ever
    found. builder.go: "failed to process CUSTOM action for provider %s, will generate deny configs" with
    "rbac := &rbachttp.RBAC{Rules: getBadCustomDenyRules(providerRules)}", which copies each rule of the policy
    into an RBAC_DENY policy: requests the policy would send to the provider are denied, never allowed (ignoring
    it would let through what the provider would refuse). A CUSTOM policy without rules is refused ("CUSTOM action
    without `rules` is meaningless"), so it always denies something. Returns the action to enforce: DENY."""
    rules = spec.get("rules")
    if rules is None or rules == []:
        raise p.fail("spec.rules", "CUSTOM action without `rules` is meaningless as it will never be triggered, "
                                   "add an empty rule `{}` if you want it be triggered for every request")
    provider = p.fields(spec.get("provider") if spec.get("provider") is not None else {}, "spec.provider",
                        frozenset({"name"}))
    name = provider.get("name")
    if name is not None:
        p.string(name, "spec.provider.name")
    if not name:
        raise p.fail("spec.provider.name", "`provider.name` must not be empty")
    for i, rule in enumerate(p.list(rules, "spec.rules")):
        if not isinstance(rule, dict):
            continue   # the rule parser says what is wrong with it
        for j, frm in enumerate(rule.get("from") or ()):
            src = frm.get("source") if isinstance(frm, dict) else None
            for key, label in _CUSTOM_UNSUPPORTED_SOURCE:
                if isinstance(src, dict) and src.get(key) not in (None, [], {}):
                    raise p.fail(f"spec.rules[{i}].from[{j}].source.{key}",
                                 f"{label} is currently not supported with CUSTOM action")
        for j, cond in enumerate(rule.get("when") or ()):
            key = cond.get("key") if isinstance(cond, dict) else None
            if isinstance(key, str) and (key in _CUSTOM_UNSUPPORTED_WHEN or key.startswith("request.auth.")):
                raise p.fail(f"spec.rules[{i}].when[{j}].key", f"{key} is currently not supported with CUSTOM action")
    p.warnings.append(
        f"spec.action: CUSTOM (extension provider {name!r}) is not enforced by hbone-proxy, which has no external "
        "authorization client; as istiod does when the provider is not found, its rules DENY what they match "
        "(requests it would send to the provider are refused, none is allowed by it)")
    return m.DENY


def _warn_http_only_deny(p: _PolicyParser, rules: list[m.Rule]) -> None:
    # validation.go: the webhook's warning for DENY rules that only use HTTP attributes.
    for rule in rules:
        for clause in rule.clauses:
            if clause.label not in ("from", "to"):
                continue
            if all(f.envoy_http_only for mt in clause.matches for f in mt.fields):
                p.warnings.append(
                    f"spec.rules[{rule.index}]: configured AuthorizationPolicy will deny all traffic to TCP ports "
                    "under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended "
                    "to explicitly specify the port")
                break


# ---- ztunnel-format policies ---------------------------------------------------------------------

ZT_FIELDS = frozenset({"name", "namespace", "scope", "action", "rules", "dryRun"})
ZT_MATCH_FIELDS = (
    "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts", "principals", "notPrincipals",
    "sourceIps", "notSourceIps", "destinationIps", "notDestinationIps", "destinationPorts", "notDestinationPorts",
)
ZT_SCOPES = (m.SCOPE_GLOBAL, m.SCOPE_NAMESPACE, m.SCOPE_WORKLOAD_SELECTOR)
ZT_ACTIONS = {"Allow": m.ALLOW, "Deny": m.DENY}
ZT_STRING_MATCH = {"Exact": "exact", "Prefix": "prefix", "Suffix": "suffix", "Presence": "presence"}


class _ZtunnelParser(_Reader):
    def string_match(self, raw: Any, path: str) -> StringMatch:
        # serde externally tagged enum: {Exact: "x"} | {Prefix: "x"} | {Suffix: "x"} | {Presence: []}
        if not isinstance(raw, dict) or len(raw) != 1:
            raise self.fail(path, 'expected one of {Exact: "..."}, {Prefix: "..."}, {Suffix: "..."}, {Presence: []}')
        (tag, value), = raw.items()
        if tag not in ZT_STRING_MATCH:
            raise self.fail(path, f"unknown variant {tag!r}, expected one of Exact, Prefix, Suffix, Presence")
        if tag == "Presence":
            if value not in ([], None):
                raise self.fail(_join(path, tag), "expected [] (Presence takes no value)")
            return StringMatch("presence", "")
        return StringMatch(ZT_STRING_MATCH[tag], self.string(value, _join(path, tag)))

    def match(self, raw: Any, path: str) -> m.ZtunnelMatch:
        body = self.fields(raw, path, frozenset(ZT_MATCH_FIELDS))
        fields = []
        spec = (
            ("namespaces", m.A_SOURCE_NAMESPACE, self.string_match),
            ("serviceAccounts", m.A_SOURCE_SERVICE_ACCOUNT, self.service_account),
            ("principals", m.A_SOURCE_PRINCIPAL, self.string_match),
            ("sourceIps", m.A_SOURCE_IP, self.cidr),
            ("destinationIps", m.A_DESTINATION_IP, self.cidr),
            ("destinationPorts", m.A_DESTINATION_PORT, self.port),
        )
        for name, attr, parse in spec:
            vals = []
            for key in (name, _not(name)):
                items = self.list(body[key], _join(path, key)) if body.get(key) is not None else []
                vals.append(tuple(parse(x, f"{path}.{key}[{i}]") for i, x in enumerate(items)))
            if vals[0] or vals[1]:
                fields.append(m.Field(attr, name, vals[0], vals[1]))
        return m.ZtunnelMatch(tuple(fields))

    def service_account(self, raw: Any, path: str) -> m.ServiceAccountMatch:
        body = self.fields(raw, path, frozenset({"namespace", "serviceAccount"}))
        for k in ("namespace", "serviceAccount"):
            if k not in body:
                raise self.fail(_join(path, k), "required field missing")
        return m.ServiceAccountMatch(self.string(body["namespace"], _join(path, "namespace")),
                                     self.string(body["serviceAccount"], _join(path, "serviceAccount")))

    def cidr(self, raw: Any, path: str) -> m.IpMatch:
        try:
            return _parse_cidr(self.string(raw, path))
        except ValueError as e:
            raise self.fail(path, str(e)) from None

    def port(self, raw: Any, path: str) -> m.PortMatch:
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
            raise self.fail(path, f"expected a port number 0-65535, got {raw!r}")
        return m.PortMatch(raw)


def parse_ztunnel_policy(item: dict, where: Where, path: str) -> m.AuthorizationPolicy:
    """One ztunnel ``Authorization`` (inventory ``policies[i]``): camelCase, every field required
    (``dryRun`` has no serde default), unknown fields rejected (``deny_unknown_fields``)."""
    r = _ZtunnelParser(where)
    body = r.fields(item, path, ZT_FIELDS)
    for k in sorted(ZT_FIELDS):
        if k not in body:
            raise r.fail(_join(path, k), "required field missing")
    name = r.string(body["name"], _join(path, "name"))
    namespace = r.string(body["namespace"], _join(path, "namespace"))
    scope = r.string(body["scope"], _join(path, "scope"))
    if scope not in ZT_SCOPES:
        raise r.fail(_join(path, "scope"), f"expected one of {', '.join(ZT_SCOPES)}, got {scope!r}")
    action = r.string(body["action"], _join(path, "action"))
    if action not in ZT_ACTIONS:
        # ztunnel: "ztunnel does not support the X action" for anything but Allow/Deny.
        raise r.fail(_join(path, "action"), f"expected Allow or Deny, got {action!r}")
    if not isinstance(body["dryRun"], bool):
        raise r.fail(_join(path, "dryRun"), f"expected a boolean, got {_kind(body['dryRun'])}")
    rules = []
    for ri, rule in enumerate(r.list(body["rules"], _join(path, "rules"))):
        rpath = f"{path}.rules[{ri}]"
        clauses = []
        for ci, clause in enumerate(r.list(rule, rpath)):
            cpath = f"{rpath}[{ci}]"
            matches = tuple(r.match(x, f"{cpath}[{mi}]") for mi, x in enumerate(r.list(clause, cpath)))
            clauses.append(m.Clause(f"clauses[{ci}]", matches))
        rules.append(m.Rule(ri, tuple(clauses)))
    return m.AuthorizationPolicy(
        namespace=namespace, name=name, action=ZT_ACTIONS[action], rules=tuple(rules),
        dry_run=body["dryRun"], origin=m.ORIGIN_ZTUNNEL, ztunnel_scope=scope,
    )
