"""OCI images: the layout on disk (umoci) and registries (skopeo)."""
