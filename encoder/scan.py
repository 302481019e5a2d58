"""Streaming, recursive scan of an image folder, filtered by extension.

``scan_images`` is a generator over ``os.scandir`` with an explicit stack of directories,
so memory holds one directory's open iterator per level, never the whole listing: a
folder of a million files is not held in memory at once.  Symlinked *directories* are
not descended (no loops, no escapes); symlinked *files* are yielded and the loader decides
(``outside_root``, ``missing``, ``unreadable``).  A directory whose name looks like an
image (``x.jpg/``) is yielded too, so that it shows up as ``not_a_file``, and is descended.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encoder.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ScanEntry:
    id: str  # path relative to the root, "/"-separated
    size: int | None
    mtime_ns: int | None

    @property
    def resume_key(self) -> tuple[str, int | None, int | None]:
        """An image counts as done when a row with the same path, size and mtime is ok."""
        return (self.id, self.size, self.mtime_ns)


def _looks_like_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: str | Path) -> Iterator[ScanEntry]:
    root = os.fspath(root)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            iterator = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError:
            continue  # an unreadable sub-directory: nothing we could encode in it
        with iterator:
            for entry in iterator:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_link, is_dir = False, False
                if is_dir:
                    stack.append(rel)
                if not _looks_like_image(entry.name):
                    continue
                size = mtime = None
                if not is_dir:
                    try:
                        st = entry.stat(follow_symlinks=is_link)
                        size, mtime = st.st_size, st.st_mtime_ns
                    except OSError:
                        pass
                yield ScanEntry(rel, size, mtime)
