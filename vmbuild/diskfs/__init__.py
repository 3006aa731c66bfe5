"""Offline disk inspection: partition tables, ext filesystems, the AWS bootability lint."""
