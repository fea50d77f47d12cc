"""hbone/: HTTP/2 CONNECT over mutual TLS (HBONE), as ztunnel speaks it. Knows nothing of policy or routing."""
