"""``Runner``: the one loop from image ids to stored outputs, for every way of running.

read (``encoder.reader``: decode ahead in a thread pool) -> encode (a mapper: pixels to
codes, or to features) -> write (a sink: ``ShardWriter``, or ``FeatureMean`` for
``fit-center``) -> report (a progress bar, or nothing), timing each stage apart.  ``imgenc
encode`` feeds it ids from a folder scan, the Celery worker from a task message, ``imgenc
fit-center`` from a sample of the folder: they differ only in who hands out the ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from encoder.images import LoadResult
from encoder.manifest import StatusTotals
from encoder.reader import Loader, read_batches

Mapper = Callable[[np.ndarray], np.ndarray]


class Sink(Protocol):
    """Where a batch's outputs go: one output row per ok result, in order."""

    def add(self, results: list[LoadResult], outputs: np.ndarray) -> None: ...
    def flush(self) -> object: ...


class Progress(Protocol):
    def update(self, results: list[LoadResult]) -> None: ...


@dataclass
class RunStats(StatusTotals):
    """What one run did: images per status, and seconds per stage."""

    counts: dict[str, int] = field(default_factory=dict)
    read_seconds: float = 0.0  # waiting for decoded batches (decoding itself overlaps)
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0  # wall clock, start to end
    interrupted: bool = False  # Ctrl-C: the batch in flight was dropped, the rest written

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def stage_line(self) -> str:
        return (
            f"read {self.read_seconds:.1f} s, encode {self.encode_seconds:.1f} s, "
            f"write {self.write_seconds:.1f} s"
        )


class Runner:
    """Runs ids through loader -> mapper -> sink; see the module docstring."""

    def __init__(
        self,
        loader: Loader,
        mapper: Mapper,
        sink: Sink,
        empty_output: np.ndarray,
        batch_size: int = 32,
        decode_threads: int = 2,
        progress: Progress | None = None,
    ) -> None:
        self.loader = loader
        self.mapper = mapper
        self.sink = sink
        self.empty_output = empty_output  # what a batch without any ok image maps to
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.progress = progress

    def run(self, ids: Iterable[str]) -> RunStats:
        """Encode and write every id, then flush the sink.  Ctrl-C ends the run cleanly:
        whole batches already encoded are written, and ``stats.interrupted`` says so."""
        stats = RunStats()
        clock = time.perf_counter
        start = mark = clock()
        batches = read_batches(ids, self.loader, self.batch_size, self.decode_threads)
        try:
            for results in batches:
                now = clock()
                stats.read_seconds += now - mark
                pixels = [r.pixels for r in results if r.ok]
                outputs = self.mapper(np.stack(pixels)) if pixels else self.empty_output
                for r in results:
                    r.pixels = None
                    stats.counts[str(r.status)] = stats.counts.get(str(r.status), 0) + 1
                mark = clock()
                stats.encode_seconds += mark - now
                self.sink.add(results, outputs)
                if self.progress is not None:
                    self.progress.update(results)
                now, mark = mark, clock()
                stats.write_seconds += mark - now
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            batches.close()  # stop the decode-ahead threads before anything else
        now = clock()
        self.sink.flush()
        stats.write_seconds += clock() - now
        stats.seconds = clock() - start
        return stats
