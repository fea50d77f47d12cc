"""policy/: Istio authorization and traffic routing as a pure library (no I/O, no clock, no randomness
of its own). Reads the resources users already write and decides as Istio does."""
