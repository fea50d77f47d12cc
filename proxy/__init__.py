"""proxy/: the waypoint and node-proxy pipeline: accept → terminate → chain match → sniff → authorize →
route → originate → relay, plus the operational surface (admin, metrics, logs, CLI)."""
