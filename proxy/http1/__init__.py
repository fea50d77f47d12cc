"""HTTP/1.1 for the waypoint's L7 path: an llhttp (httptools) codec, a keep-alive server loop and an
upstream client, all over ``hbone.stream.ByteStream``. See ``codec`` for limits and framing rules."""
