"""connect_originate: the last hop of a tunnel or request — open a byte stream to one chosen endpoint.

Istio's waypoint names this listener ``connect_originate`` (reference: DESIGN §1; seed). The rules are
ztunnel's (reference/ztunnel.md §1.4, src/proxy/outbound.rs ``build_request``):

* a workload whose ``protocol`` is HBONE is reached with HBONE: mTLS to ``<pod ip>:15008`` (pooled by
  ``hbone.pool.HbonePool``), ``CONNECT`` with ``:authority <pod ip>:<target port>``, headers
  ``forwarded: for="<src>"[;host=<svc>]``, ``baggage``, ``traceparent``; the server must present the
  workload's own SPIFFE identity (or one of the service's ``subjectAltNames``);
* any other workload (``protocol: TCP``, "not in the mesh") is reached with plain TCP to
  ``<pod ip>:<target port>``;
* a workload with a ``hostname`` and no IP (a ServiceEntry ``resolution: DNS`` endpoint) is resolved first
  (``proxy.dns.Resolver``: Envoy's STRICT_DNS cluster, ztunnel's on-demand DNS), then dialled as above at the
  address it resolved to; a name that does not resolve is a connect failure (503 ``UF``, reason ``dns``).

Every failure is turned into a ``ProxyError`` that carries its answer (503 ``UF``) and a retry
``outcome`` (Envoy's ``connect-failure``), so the router can decide to try another host. The connect
timeout is Istio's ``MeshConfig.connectTimeout`` (10 s) unless the DestinationRule says otherwise.
"""

from __future__ import annotations

import asyncio
import random
from typing import Iterable

from certs.rotation import CertSource
from certs.spiffe import SpiffeError, SpiffeId
from hbone.connect import build_forwarded, format_authority, new_traceparent
from hbone.errors import ConnectFailed, HboneError, TunnelRefused
from hbone.pool import HbonePool
from hbone.settings import HboneSettings
from hbone.stream import ByteStream, TcpStream
from policy.routing.endpoints import Candidate
from policy.routing.model import CONNECT_FAILURE, CONNECT_TIMEOUT_DEFAULT_S
from proxy.dns import STRICT_DNS, DnsFailure, Resolver
from proxy.errors import UpstreamConnectFailure

# Istio MeshConfig.connectTimeout default (pkg/config/mesh/mesh.go), also ztunnel's 10 s.
CONNECT_TIMEOUT_S = CONNECT_TIMEOUT_DEFAULT_S
# The HBONE port every mesh workload listens on (Istio convention; ztunnel hbone_port).
HBONE_PORT = 15008


class OriginateFailed(UpstreamConnectFailure):
    """Opening the upstream stream failed: 503 with Envoy's ``UF``; retriable as ``connect-failure``.

    ``reason``: ``refused`` | ``timeout`` | ``dns`` | ``tls`` | ``identity`` | ``closed`` | ``protocol`` |
    ``tunnel_401`` / ``tunnel_503`` (the peer's node proxy answered the CONNECT with that status:
    its L4 policy denied the waypoint, or its workload could not be reached).
    """

    outcome = CONNECT_FAILURE   # the router's retry_on name for this failure

    def __init__(self, reason: str, message: str, *, upstream: str, status: int | None = None):
        # Envoy %RESPONSE_CODE_DETAILS% for a failed upstream connect; the reason in braces says which.
        super().__init__(f"{upstream}: {message}",
                         detail=f"upstream_reset_before_response_started{{connection_failure,{reason}}}")
        self.reason = reason
        self.upstream = upstream
        self.tunnel_status = status


class Originator:
    """connect_originate: opens upstream byte streams (HBONE through a pool, or plain TCP).

    ``cert_source`` gives the waypoint's identity (the HBONE client certificate) and its client TLS
    context, read on every dial so that certificate rotation applies to new connections only.
    """

    def __init__(self, cert_source: CertSource, *, settings: HboneSettings = HboneSettings(),
                 pool: HbonePool | None = None, rng: random.Random | None = None,
                 hbone_port: int = HBONE_PORT, source_ip: str | None = None, resolver: Resolver | None = None):
        self.cert_source = cert_source
        # Endpoint hostnames (DNS ServiceEntries), resolved at connect time with a cache (proxy/dns.py).
        self.resolver = resolver or Resolver(rng=rng)
        # Dial from our own pod IP (the waypoint's HBONE address), as a pod's traffic leaves from its
        # IP: the destination node proxy then logs and authorizes the waypoint's address, not 127.0.0.1.
        self.source_ip = source_ip
        self.pool = pool or HbonePool(cert_source.client_context, trust_domain=cert_source.trust_domain,
                                      settings=settings)
        self.rng = rng or random.Random()
        self.hbone_port = hbone_port
        self.opened_hbone = 0
        self.opened_tcp = 0
        self.failed = 0

    async def open(self, candidate: Candidate, *, authority_port: int | None = None,
                   source: tuple[str, int], service_hostname: str | None = None,
                   timeout: float | None = CONNECT_TIMEOUT_S, subject_alt_names: Iterable[str] = (),
                   baggage: str | None = None, traceparent: str | None = None,
                   local_host: str | None = None) -> ByteStream:
        """A stream to ``candidate`` (``candidate.ip``), port ``authority_port`` (default: the
        candidate's target port). ``source`` is the downstream client's address (for ``forwarded``),
        ``service_hostname`` the service it addressed (``;host=``). Raises ``OriginateFailed``."""
        port = candidate.target_port if authority_port is None else authority_port
        local_host = local_host or self.source_ip
        workload = candidate.workload
        ip = candidate.ip
        if not workload.workload_ips:   # a hostname endpoint (endpoints_for keeps it only with a hostname)
            ip = await self._resolve(ip, port, timeout, workload.dns_lookup or STRICT_DNS)
        if workload.protocol != "HBONE":
            return await self._open_tcp(ip, port, timeout, local_host)
        identities = set()
        for uri in (workload.identity, *subject_alt_names):
            try:
                identities.add(SpiffeId.parse(uri))
            except SpiffeError:
                continue   # a non-SPIFFE SAN (DNS name) can never match an HBONE peer
        headers = {"forwarded": build_forwarded(source, service_hostname)}
        if baggage:
            headers["baggage"] = baggage
        # ztunnel: a fresh W3C traceparent per outbound downstream connection (TraceParent::new()).
        headers["traceparent"] = traceparent or str(new_traceparent(self.rng))
        authority = format_authority(ip, port)
        upstream = f"{format_authority(ip, self.hbone_port)} (HBONE {authority})"
        try:
            async with asyncio.timeout(timeout):
                stream = await self.pool.open_tunnel(
                    src_identity=self.cert_source.identity, dst_identities=frozenset(identities),
                    dst=(ip, self.hbone_port), authority=authority, headers=headers,
                    local_host=local_host)
        except TimeoutError:
            self.failed += 1
            raise OriginateFailed("timeout", f"no tunnel within {timeout:g}s", upstream=upstream) from None
        except TunnelRefused as err:
            self.failed += 1
            raise OriginateFailed(f"tunnel_{err.status}", f"CONNECT answered {err.status}",
                                  upstream=upstream, status=err.status) from None
        except ConnectFailed as err:
            self.failed += 1
            raise OriginateFailed(err.reason, str(err), upstream=upstream) from None
        except HboneError as err:   # BadAuthority/BadRequest: a request we could not even send
            self.failed += 1
            raise OriginateFailed("protocol", str(err), upstream=upstream) from None
        self.opened_hbone += 1
        return stream

    async def _resolve(self, host: str, port: int, timeout: float | None, mode: str = STRICT_DNS) -> str:
        """The address to dial for an endpoint hostname, within the connect timeout. ``DnsFailure`` becomes
        ``OriginateFailed("dns")``: ztunnel fails the connection (NoResolvedAddresses), and here it is retried
        like any connect failure (another endpoint, if there is one)."""
        try:
            async with asyncio.timeout(timeout):
                # ``mode``: the endpoint's Workload.dns_lookup — STRICT_DNS (resolution DNS: any address) or
                # LOGICAL_DNS (DNS_ROUND_ROBIN: the first), as Envoy's cluster types.
                return await self.resolver.address_for(host, mode)
        except TimeoutError:
            self.failed += 1
            raise OriginateFailed("dns", f"{host} not resolved within {timeout:g}s",
                                  upstream=format_authority(host, port)) from None
        except DnsFailure as err:
            self.failed += 1
            raise OriginateFailed("dns", str(err), upstream=format_authority(host, port)) from None

    async def _open_tcp(self, ip: str, port: int, timeout: float | None,
                        local_host: str | None) -> ByteStream:
        upstream = format_authority(ip, port)
        try:
            async with asyncio.timeout(timeout):
                stream = await TcpStream.connect(ip, port, local_host=local_host)
        except TimeoutError:
            self.failed += 1
            raise OriginateFailed("timeout", f"no TCP connection within {timeout:g}s",
                                  upstream=upstream) from None
        except OSError as err:
            self.failed += 1
            raise OriginateFailed("refused", err.strerror or str(err), upstream=upstream) from None
        self.opened_tcp += 1
        return stream

    async def close(self) -> None:
        await self.pool.close()

    def __repr__(self) -> str:
        return (f"<Originator as={self.cert_source.identity} hbone={self.opened_hbone} tcp={self.opened_tcp} "
                f"failed={self.failed} {self.pool!r}>")


__all__ = ["Originator", "OriginateFailed", "CONNECT_TIMEOUT_S", "HBONE_PORT"]
