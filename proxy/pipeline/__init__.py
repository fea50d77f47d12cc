"""The waypoint pipeline, read top to bottom as Envoy's life of a request:

connect_terminate (hbone.server) → main_internal (``main``): chain match (``chains``) → protocol
(appProtocol or ``proxy.sniff``) → L4 authorization (``authz``) → per protocol: HTTP/1.1 requests
(``http``: L7 authorization, route, fault, weighted destination, endpoint, retries/timeouts) or a TCP
relay (``tcp``) → connect_originate (``originate``). ``answers`` is the one place a ``ProxyError``
becomes a CONNECT status, an HTTP local reply, a metric and an access-log line.
"""
