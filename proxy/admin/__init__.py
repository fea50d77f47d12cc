"""The operator's surface: the admin/metrics/readiness HTTP server, Envoy-style config views, and the
``proxy-config`` / ``explain`` commands that read a running proxy's admin endpoint."""
