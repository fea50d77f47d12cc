"""``hbone-proxy explain``: ask a running proxy how it would handle one request — the chain it
matches, the policies evaluated and the one that decided, the route and the candidate endpoints.

The client POSTs an ``ExplainRequest`` as JSON to the admin endpoint ``/explain``; the proxy answers
with an explanation object (schema below) computed by the pipeline, without sending any traffic.

Request (JSON object)::

    {"from": "spiffe://cluster.local/ns/default/sa/productpage",   # required: source identity
     "to": "10.96.104.108:9080",                                   # required: HOST:PORT (VIP, pod IP or hostname)
     "method": "GET", "path": "/reviews/1",                        # optional: omit both for L4 only
     "headers": {"x-user": "jason"}}                               # optional

Answer (JSON object; every key optional but ``decision``)::

    {"decision": "allow" | "deny" | "no-route" | "unknown-destination",
     "chain": "inbound-vip|9080||reviews.default.svc.cluster.local-http",
     "service": "reviews.default.svc.cluster.local",
     "protocol": "http" | "tcp",
     "authorization": {"decidedBy": "default/deny-jason" | null, "rule": 0 | null,
                       "detail": "rbac_access_denied_matched_policy[ns[default]-policy[deny-jason]-rule[0]]",
                       "policies": [{"name": "default/deny-jason", "action": "DENY", "matched": true,
                                     "rule": 0, "reason": "header x-user=jason"}]},
     "route": {"name": "inbound-vip|9080|http|reviews.default.svc.cluster.local",
               "config": "reviews.default", "match": "/*", "timeout": "0s",
               "retries": {"attempts": 2, "retryOn": "connect-failure,..."},
               "clusters": [{"name": "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local", "weight": 90}]},
     "endpoints": [{"address": "10.244.2.11:9080", "cluster": "...|http/v1|...", "status": "HEALTHY", "hbone": true}],
     "response": {"status": 403, "body": "RBAC: access denied", "flags": "-"},
     "notes": ["free text the proxy wants to add"]}
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from .proxy_config import FETCH_TIMEOUT_S, FetchError, fetch_json
from .server import ADMIN_ADDR
from .views import ordered_retry_on

HTTP_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class ExplainRequest:
    source: str                                  # SPIFFE identity of the caller
    to: str                                      # HOST:PORT
    method: str = ""
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.to.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.to.rpartition(":")[2])

    @classmethod
    def from_json(cls, obj: Any) -> "ExplainRequest":
        """Validate the ``/explain`` body; raises ``ValueError`` with the field at fault (→ 400)."""
        if not isinstance(obj, dict):
            raise ValueError("explain request must be a JSON object")
        unknown = set(obj) - {"from", "to", "method", "path", "headers"}
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        source, to = obj.get("from"), obj.get("to")
        if not isinstance(source, str) or not source.startswith("spiffe://"):
            raise ValueError("from: a SPIFFE id is required (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
        if not isinstance(to, str) or ":" not in to:
            raise ValueError("to: HOST:PORT is required")
        port = to.rpartition(":")[2]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"to: bad port in {to!r}")
        method, path = obj.get("method", "") or "", obj.get("path", "") or ""
        if not isinstance(method, str) or (method and not set(method) <= HTTP_TOKEN):
            raise ValueError("method: must be an HTTP token such as GET")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise ValueError("path: must start with /")
        headers = obj.get("headers")
        headers = {} if headers is None else headers
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ValueError("headers: must be an object of string values")
        if (method or path or headers) and not (method and path):
            # an HTTP question needs both; fill the usual defaults rather than refuse
            method, path = method or "GET", path or "/"
        return cls(source, to, method, path, {k.lower(): v for k, v in headers.items()})

    def to_json(self) -> dict:
        d: dict[str, Any] = {"from": self.source, "to": self.to}
        if self.method:
            d["method"] = self.method
        if self.path:
            d["path"] = self.path
        if self.headers:
            d["headers"] = dict(self.headers)
        return d


def format_answer(req: ExplainRequest, ans: Mapping[str, Any]) -> str:
    """A readable rendering of an explanation, top to bottom in pipeline order."""
    out: list[str] = []
    what = f"{req.method} {req.path} " if req.method else "connection "
    out.append(f"request     {what}from {req.source} to {req.to}")
    if ans.get("chain"):
        extra = ", ".join(x for x in (f"service {ans['service']}" if ans.get("service") else "",
                                      f"protocol {ans['protocol']}" if ans.get("protocol") else "") if x)
        out.append(f"chain       {ans['chain']}" + (f" ({extra})" if extra else ""))
    else:
        out.append("chain       (none matched)")
    authz = ans.get("authorization") or {}
    if authz:
        decided = authz.get("decidedBy")
        rule = authz.get("rule")
        verdict = "DENY" if ans.get("decision") == "deny" else "ALLOW"
        who = f"by {decided}" + (f" rule {rule}" if rule is not None else "") if decided else "by default"
        out.append(f"authorize   {verdict} {who}")
        if authz.get("detail"):
            out.append(f"            {authz['detail']}")
        for p in authz.get("policies", []):
            mark = "matched" if p.get("matched") else "not matched"
            rule_txt = f" rule {p['rule']}" if p.get("rule") is not None else ""
            reason = f": {p['reason']}" if p.get("reason") else ""
            out.append(f"  {p.get('action', '?'):<6} {p.get('name', '?')} {mark}{rule_txt}{reason}")
    route = ans.get("route")
    if route:
        cfg = f" ({route['config']})" if route.get("config") else ""
        # The pipeline names the rule that matched (its index in the route); a view may give the match text.
        which = (f" match {route['match']}" if route.get("match") else
                 f" rule {route['rule']}" if route.get("rule") is not None else "")
        out.append(f"route       {route.get('name', '')}{cfg}{which}")
        if route.get("timeout"):
            out.append(f"  timeout {route['timeout']}")
        if route.get("retries"):
            r = route["retries"]
            on = ",".join(ordered_retry_on(c for c in str(r.get("retryOn", "")).split(",") if c))
            out.append(f"  retries {r.get('attempts')} on {on}")
        for c in route.get("clusters", []):
            out.append(f"  -> {c.get('name')} weight {c.get('weight')}")
    eps = ans.get("endpoints")
    if eps:
        out.append("endpoints")
        for e in eps:
            via = " via HBONE" if e.get("hbone") else ""
            out.append(f"  {e.get('address')} {e.get('status', '')} {e.get('cluster', '')}{via}".rstrip())
    resp = ans.get("response")
    if resp:
        flags = f" flags {resp['flags']}" if resp.get("flags") and resp["flags"] != "-" else ""
        body = f" {resp['body']}" if resp.get("body") else ""
        out.append(f"answer      {resp.get('status')}{body}{flags}")
    out.append(f"decision    {ans.get('decision', 'unknown')}")
    for note in ans.get("notes", []):
        out.append(f"note        {note}")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hbone-proxy explain",
                                description="Ask a running proxy how it would handle a request.")
    p.add_argument("--admin", default=ADMIN_ADDR, metavar="ADDR", help=f"admin address (default {ADMIN_ADDR})")
    p.add_argument("--from", dest="source", required=True, metavar="SPIFFE_ID")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--method")
    p.add_argument("--path")
    p.add_argument("--header", action="append", default=[], metavar="K=V")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("--timeout", type=float, default=FETCH_TIMEOUT_S)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    headers = {}
    for h in args.header:
        k, sep, v = h.partition("=")
        if not sep or not k:
            print(f"hbone-proxy explain: --header wants K=V, got {h!r}", file=sys.stderr)
            return 2
        headers[k] = v
    raw = {"from": args.source, "to": args.to, "method": args.method or "", "path": args.path or "",
           "headers": headers}
    try:
        req = ExplainRequest.from_json(raw)
    except ValueError as err:
        print(f"hbone-proxy explain: {err}", file=sys.stderr)
        return 2
    try:
        ans = fetch_json(args.admin, "/explain", body=req.to_json(), timeout=args.timeout)
    except FetchError as err:
        print(f"hbone-proxy explain: {err}", file=sys.stderr)
        return 1
    if not isinstance(ans, dict):
        print("hbone-proxy explain: the proxy's answer is not a JSON object", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(ans, indent=2) + "\n" if args.output == "json" else format_answer(req, ans))
    return 0
