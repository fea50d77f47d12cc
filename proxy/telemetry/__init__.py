"""Telemetry: Istio standard metrics (``metrics``) and the JSON access log (``accesslog``).

The pipeline calls these; nothing here knows about sockets or policy evaluation.
"""
