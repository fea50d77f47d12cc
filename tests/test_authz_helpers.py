"""Builders shared by the authorization tests (no tests here): policies from spec dicts, requests with defaults."""

from __future__ import annotations

from typing import Any

from policy.authz import AuthzRequest, Enforcement, HttpAttributes, authorize, parse_authorization_policy
from policy.authz.parse import parse_ztunnel_policy
from policy.errors import Where

CLIENT = "cluster.local/ns/default/sa/client"
OTHER = "cluster.local/ns/other/sa/intruder"
WAYPOINT = Enforcement.WAYPOINT
ZTUNNEL = Enforcement.ZTUNNEL


def policy(spec: dict | None = None, *, name: str = "p", namespace: str = "default", dry_run: bool = False,
           api: str = "security.istio.io/v1"):
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    doc = {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": meta}
    if spec is not None:
        doc["spec"] = spec
    return parse_authorization_policy(doc, Where("test.yaml"))


def allow(*rules, **kw):
    return policy({"action": "ALLOW", "rules": list(rules)}, **kw)


def deny(*rules, **kw):
    return policy({"action": "DENY", "rules": list(rules)}, **kw)


def ztunnel_policy(rules, *, action="Allow", scope="Namespace", name="z", namespace="default", dry_run=False):
    item = {"name": name, "namespace": namespace, "scope": scope, "action": action, "rules": rules, "dryRun": dry_run}
    return parse_ztunnel_policy(item, Where("inventory.yaml"), "policies[0]")


def tcp(*, src="10.0.0.1", principal: str | None = CLIENT, dst="10.0.0.2", port=8080, sni=None, remote=None):
    return AuthzRequest(src, principal, dst, port, None, sni, remote)


def http(method="GET", path="/", host="svc.default.svc.cluster.local", headers=None, *, src="10.0.0.1",
         principal: str | None = CLIENT, dst="10.0.0.2", port=8080, request_principal=None, claims=None,
         sni=None, remote=None):
    h = {k.lower(): (tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in (headers or {}).items()}
    return AuthzRequest(src, principal, dst, port,
                        HttpAttributes(method, path, host, h, request_principal, claims), sni, remote)


def allowed(request, *policies, at=WAYPOINT) -> bool:
    return authorize(request, list(policies), at).allowed
