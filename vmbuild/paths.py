"""Where vmbuild keeps things: the user cache dir (bases) and the artifact store.

Every one is returned absolute, resolved against the working directory once:
the default store is `./images`, and a relative path would be read again
against other directories (a qcow2 backing file name is relative to the
overlay's own directory; testinfra runs in the tests' directory).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$VMBUILD_CACHE_DIR`, else `$XDG_CACHE_HOME/vmbuild`, else `~/.cache/vmbuild`."""
    explicit = os.environ.get("VMBUILD_CACHE_DIR")
    if explicit:
        return Path(explicit).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "vmbuild").absolute()


def store_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--store`, else `$VMBUILD_STORE`, else `./images`."""
    if explicit:
        return Path(explicit).absolute()
    env = os.environ.get("VMBUILD_STORE")
    return (Path(env) if env else Path("images")).absolute()


def config_dir() -> Path:
    """`$VMBUILD_CONFIG_DIR`, else `$XDG_CONFIG_HOME/vmbuild`, else `~/.config/vmbuild`."""
    explicit = os.environ.get("VMBUILD_CONFIG_DIR")
    if explicit:
        return Path(explicit).absolute()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return (base / "vmbuild").absolute()


def state_dir() -> Path:
    """`$VMBUILD_STATE_DIR`, else `$XDG_STATE_HOME/vmbuild`, else `~/.local/state/vmbuild`.

    State, not cache: the registry of running vmbuild processes and the logs of
    failed runs (pruned by age) must survive a cache wipe.
    """
    explicit = os.environ.get("VMBUILD_STATE_DIR")
    if explicit:
        return Path(explicit).absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return (base / "vmbuild").absolute()
