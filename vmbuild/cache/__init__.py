"""Host-side caches: the package proxy and build checkpoints."""
