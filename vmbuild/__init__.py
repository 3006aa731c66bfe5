"""vmbuild: a local, open-source EC2 Image Builder."""

__version__ = "0.1.0"
