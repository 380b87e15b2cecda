"""Where request content must never be: the privacy tests' search of the disk."""

from __future__ import annotations

import os
from pathlib import Path


def files_containing(roots: list[Path], needle: bytes, since: float) -> list[Path]:
    """Files under `roots`, written since `since`, that contain `needle`."""
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root, onerror=lambda _: None):
            for name in names:
                path = Path(dirpath, name)
                try:
                    if path.is_symlink() or not path.is_file() or path.stat().st_mtime < since:
                        continue
                    if needle in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue
    return found
