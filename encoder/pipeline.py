"""The encoding loop shared by ``imgenc encode`` and the Celery worker.

``encode_stream`` is the mapper: image ids in, ``(results, codes)`` per batch out.  Images
are decoded by ``ImageLoader`` in a thread pool that runs ``prefetch`` batches ahead, while
the model encodes the current batch in the calling thread (TensorFlow and Pillow both
release the GIL).  Who hands out the ids (a folder scan, a Celery message) and where the
codes go (``ShardWriter``) are the caller's business.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from encoder.images import ImageLoader, LoadResult

EncodeFn = Callable[[np.ndarray], np.ndarray]


def encode_stream(
    ids: Iterable[str],
    loader: ImageLoader,
    encode: EncodeFn,
    batch_size: int,
    decode_threads: int = 2,
    prefetch: int = 2,
    bytes_per_code: int = 0,
) -> Iterator[tuple[list[LoadResult], np.ndarray]]:
    """Yield ``(results, codes)`` per batch: every image's ``LoadResult`` (pixels dropped)
    and one packed code row per ok result, in order."""
    id_iter = iter(ids)
    pending: deque[list[Future[list[LoadResult]]]] = deque()

    def load_slice(slice_ids: list[str]) -> list[LoadResult]:
        return [loader.load(image_id) for image_id in slice_ids]

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
                ok = [r.pixels for r in results if r.ok]
                codes = encode(np.stack(ok)) if ok else np.zeros((0, bytes_per_code), np.uint8)
                for r in results:
                    r.pixels = None
                yield results, codes
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()
