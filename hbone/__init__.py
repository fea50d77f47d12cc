"""hbone/: HTTP/2 CONNECT over mutual TLS (HBONE), as ztunnel speaks it. Knows nothing of policy or routing.

Public API (see the README's HBONE section):
  settings.HboneSettings                      ztunnel's HTTP/2 and pool defaults
  connect.parse_authority / ConnectRequest    the CONNECT request and its headers (pure)
  protocol.ServerCore / ClientCore            sans-IO cores over h2 (bytes in, events out)
  server.HboneServer / InboundTunnel          the 15008 listener (async handler, or a plain function
                                              answering with accept_nowait / reject_nowait)
  pool.HbonePool                              origination with connection pooling
  relay.relay / relay_detached                bidirectional copy with half-close and reset propagation
  stream.TcpStream.connect / dial_tcp / Dialer  upstream TCP (awaited, callback, bounded callback)
  socktransport.SocketTransport               the pod connections' transport (our own epoll)
  errors.HboneError and subclasses            each carries its status / response flag
  _malloc.tune_malloc()                       glibc allocator tuning, once at start-up
"""

from hbone.errors import BadAuthority, BadRequest, ConnectFailed, HboneError, TunnelRefused
from hbone.settings import HboneSettings

__all__ = ["BadAuthority", "BadRequest", "ConnectFailed", "HboneError", "HboneSettings", "TunnelRefused"]
