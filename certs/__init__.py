"""certs/: SPIFFE identities, a small mesh CA and the TLS contexts HBONE uses. A library: never imports proxy/."""
