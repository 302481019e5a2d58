"""The reader: image ids in, batches of decoded ``LoadResult`` out, decoded ahead of use.

``read_batches`` keeps ``prefetch`` batches decoding in a thread pool while the caller
encodes the current one (Pillow and TensorFlow both release the GIL).  With
``decode_threads=0`` it decodes in the calling thread, one batch at a time, so that no
image is touched before the previous batch has been handed back: the Celery worker's
careful re-runs need to know exactly which image is in hand.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from encoder.images import LoadResult


class Loader(Protocol):
    def load(self, image_id: str) -> LoadResult: ...


def read_batches(
    ids: Iterable[str],
    loader: Loader,
    batch_size: int,
    decode_threads: int = 2,
    prefetch: int = 2,
) -> Iterator[list[LoadResult]]:
    """Yield one list of ``LoadResult`` per batch of ``batch_size`` ids, in order."""
    id_iter = iter(ids)

    def load_slice(slice_ids: list[str]) -> list[LoadResult]:
        return [loader.load(image_id) for image_id in slice_ids]

    if decode_threads == 0:
        while batch := list(itertools.islice(id_iter, batch_size)):
            yield load_slice(batch)
        return

    pending: deque[list[Future[list[LoadResult]]]] = deque()
    with ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode") as pool:

        def submit_next() -> bool:
            # One future per thread's share of the batch: futures cost more than tiny images.
            batch = list(itertools.islice(id_iter, batch_size))
            if batch:
                step = -(-len(batch) // decode_threads)
                pending.append(
                    [
                        pool.submit(load_slice, batch[i : i + step])
                        for i in range(0, len(batch), step)
                    ]
                )
            return bool(batch)

        for _ in range(prefetch + 1):
            if not submit_next():
                break
        try:
            while pending:
                futures = pending.popleft()
                results = [r for f in futures for r in f.result()]
                submit_next()
                yield results
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()
