"""benchmarks/: the hot path measured side by side with direct connections and nghttpx."""
