"""Where experiments live: a local folder or a bucket URI, and the experiment folder inside it.

Not a refusal module: export, console and the sweep read locations through here,
and preflight.py decides which of them a sweep may use.
"""

from __future__ import annotations

from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in path


def storage_uri(storage: str) -> str:
    """An absolute local path (Ray rejects relative ones) or the URI as given."""
    return storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def experiment_uri(root: str, name: str) -> str:
    """`root`/`name`, keeping a URI's query string (an S3 endpoint override) at its end."""
    if not is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    base, sep, query = root.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"
