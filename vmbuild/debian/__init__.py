"""Debian knowledge: apt sources, the package index, version order, the offline bootstrap."""
