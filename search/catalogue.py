"""Reading a destination's images back, by id, from where they were encoded.

The manifest records each image's path; the index keeps the image root it implies (the
path without the id).  ``CatalogueImages`` opens an image through the same
``ImageLoader`` as encoding, at that root, or at ``image_root`` when the images are now
somewhere else (``--image-root``).  The thumbnails of the results page and the
near-duplicate fit read images through it.
"""

from __future__ import annotations

from typing import Any

from encoder.images import ImageLoader, ImageStatus, LoadResult
from search.index import Index


class CatalogueImages:
    def __init__(self, index: Index, image_root: str | None = None, size: int = 224) -> None:
        self.index = index
        self.image_root = image_root
        self.size = size
        self._loaders: dict[str, ImageLoader] = {}
        self._in_memory = ImageLoader("/", size)  # for bytes: the root plays no part

    def loader(self, image_id: str) -> ImageLoader | None:
        """The loader rooted where ``image_id`` is, or None when no root is known."""
        root = self.image_root or (self.index.image(image_id)[2] if image_id in self.index else "")
        if not root:
            return None
        if root not in self._loaders:
            self._loaders[root] = ImageLoader(root, self.size)
        return self._loaders[root]

    def _unknown(self, image_id: str) -> LoadResult:
        return LoadResult(
            id=image_id, path="", status=ImageStatus.MISSING, error="no image root recorded"
        )

    def read(self, image_id: str) -> tuple[LoadResult, bytes | None]:
        loader = self.loader(image_id)
        return loader.read(image_id) if loader else (self._unknown(image_id), None)

    def load_picture(self, image_id: str, max_side: int) -> tuple[LoadResult, Any]:
        loader = self.loader(image_id)
        return (
            loader.load_picture(image_id, max_side) if loader else (self._unknown(image_id), None)
        )

    def load_bytes(self, data: bytes, image_id: str = "upload") -> LoadResult:
        return self._in_memory.load_bytes(data, image_id)

    def reachable(self, image_id: str) -> bool:
        """Whether ``image_id`` can be read where the catalogue says it is."""
        return self.read(image_id)[1] is not None
