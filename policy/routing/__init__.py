"""Traffic routing for the waypoint: a pure library (no I/O; clock and randomness are parameters).

parse    — VirtualService, DestinationRule, HTTPRoute, Gateway documents → frozen models (ConfigError on bad input)
table    — ``build_route_table``: per service port, the compiled rules (VS merged in order, HTTPRoute precedence,
           or Istio's default route), resolved to Envoy-named destinations
select   — ``route_http`` / ``route_tcp`` / ``pick_weighted``: one request against the table
endpoints— ``endpoints_for``, ``LoadBalancer``, ``OutlierDetector``: which pod gets the request
"""

from .endpoints import Candidate, LoadBalancer, OutlierDetector, endpoints_for
from .model import (
    DEFAULT_RETRY_POLICY, NO_RETRY, ConnectionPool, DestinationRule, Fault, FaultDecision, Gateway, HeaderOps,
    HeaderRules, HttpRoute, OutlierDetection, Outcome, RetryPolicy, TrafficPolicy, VirtualService,
)
from .parse import parse_destination_rule, parse_gateway, parse_http_route, parse_virtual_service
from .select import (
    DirectResponse, Forward, HttpRequestView, NoRoute, Redirect, RouteDecision, choose_destination,
    decide_fault, mirrors_for, pick_weighted, route_http, route_tcp,
)
from .table import Destination, Mirror, RouteTable, ServiceRoutes, TcpRoutes, build_route_table

__all__ = [
    "Candidate", "LoadBalancer", "OutlierDetector", "endpoints_for",
    "DEFAULT_RETRY_POLICY", "NO_RETRY", "ConnectionPool", "DestinationRule", "Fault", "FaultDecision", "Gateway",
    "HeaderOps", "HeaderRules", "HttpRoute", "OutlierDetection", "Outcome", "RetryPolicy", "TrafficPolicy",
    "VirtualService",
    "parse_destination_rule", "parse_gateway", "parse_http_route", "parse_virtual_service",
    "DirectResponse", "Forward", "HttpRequestView", "NoRoute", "Redirect", "RouteDecision", "choose_destination",
    "decide_fault", "mirrors_for", "pick_weighted", "route_http", "route_tcp",
    "Destination", "Mirror", "RouteTable", "ServiceRoutes", "TcpRoutes", "build_route_table",
]
