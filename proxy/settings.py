"""Proxy settings: the flags of ``hbone-proxy run`` (DESIGN §4), each with an ``HBONE_PROXY_*`` environment
equivalent. Pure data; ``proxy.run`` parses argv into it."""

from __future__ import annotations

from dataclasses import dataclass

# Istio's ports (DESIGN §2).
HBONE_PORT = 15008
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
SOCKS5_PORT = 15080
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021

# ztunnel: "drain period less than Kubernetes'" — 5 s default (config.rs self_termination_deadline).
DRAIN_DEADLINE_S = 5.0
# How often the config files are checked for changes (mtime/size); SIGHUP reloads at once.
CONFIG_POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ProxySettings:
    mode: str                                    # "waypoint" | "node"
    config_paths: tuple[str, ...]
    cert: str | None = None                      # --cert/--key/--ca: PEM files; identity read from the cert
    key: str | None = None
    ca: str | None = None
    ca_dir: str | None = None                    # mesh CA dir (certs init): node mode mints workload certs
    node: str | None = None                      # node mode: serve workloads whose `node` is this
    scope: str | None = None                     # waypoint: NS | NS/SA (default: own identity's namespace)
    gateway: str | None = None                   # waypoint: NS/NAME of the Gateway it serves
    identity: str | None = None                  # waypoint with --ca-dir: NS/SA to mint (default: its workload's)
    hbone_addr: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    outbound_addr: tuple[str, int] | None = ("127.0.0.1", OUTBOUND_PORT)
    inbound_plaintext_addr: tuple[str, int] | None = None
    socks5_addr: tuple[str, int] | None = ("127.0.0.1", SOCKS5_PORT)
    admin_addr: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_addr: tuple[str, int] | None = ("0.0.0.0", METRICS_PORT)
    readiness_addr: tuple[str, int] | None = ("0.0.0.0", READINESS_PORT)
    workers: int = 1
    # Not a flag: the private directory the --workers supervisor gives its workers (proxy/admin/workers.py).
    workers_dir: str | None = None
    drain_deadline_s: float = DRAIN_DEADLINE_S
    config_poll_interval_s: float = CONFIG_POLL_INTERVAL_S
    trust_domain: str = "cluster.local"
    # Istio meshConfig.trustDomainAliases: a waypoint's policy principals also match these (policy/authz/trust_domain.py).
    trust_domain_aliases: tuple[str, ...] = ()
    access_log: str | None = "-"                 # "-" = stdout, a path, or None/"off"
    log_level: str = "info"
    # --workload-cert-ttl: validity of certificates minted from --ca-dir (rotated at half-life).
    workload_cert_ttl_s: float = 24 * 3600.0
