"""The merged manifest: the parts merged into one row per image, streaming, in bounded memory.

``merge_manifest`` writes ``manifest.parquet`` (rows sorted by id, typed columns, the
image ``key`` added; ``pd.read_parquet`` or ``encoder.read_manifest`` read it in one call)
and ``manifest.json`` (the parts it covers with their versions, the totals).  The merge
rule is the one ``encoder.manifest`` states; it is applied to Arrow tables, never to a
Python object per row, as an external merge sort:

1. **Runs.**  Parts are parsed a few megabytes at a time (``MERGE_RUN_BYTES``), sorted by
   id, and reduced to at most two rows per id (the latest ``ok``/``deleted`` and the latest
   failure: the rule needs both), then written to a temporary Arrow file.
2. **K-way merge.**  The runs are read back a batch at a time and merged by id: each step
   takes, from every run, the rows below the smallest "last id" any run has in hand, so
   all rows of an id meet in one step, where the rule picks the winner.

Peak memory is a run plus a batch per run, whatever the number of rows.  When only new
parts appeared since the last merge and all their rows are later than every row merged
before, the previous ``manifest.parquet`` is one run and the old parts are not read again
(the rule then gives the same result: a later row of a kind beats every earlier one).
Temporary files go beside a local destination, or under ``TMPDIR`` for S3 and for
readers (a destination may be read-only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from encoder.keys import image_keys
from encoder.manifest import (
    DELETED,
    LEGACY_MANIFEST_KEY,
    MANIFEST_INFO_KEY,
    MANIFEST_KEY,
    OK,
    PartParser,
    arrow_schema,
    parse_parts,
    part_keys,
)
from encoder.storage import LocalStorage, Storage, StorageError

FORMAT = 1
MERGE_RUN_BYTES = 48 << 20  # CSV bytes parsed, sorted and reduced into one run
MERGE_BATCH_ROWS = 8192  # rows read from each run at a time in the k-way merge
MERGE_FAN_IN = 32  # runs merged at once; more are first merged into longer runs
ROW_GROUP_ROWS = 131072  # rows per row group of manifest.parquet
FETCH_THREADS = 16
_NO_TIME = -(2**63)  # a row without encoded_at: older than any other


@dataclass
class ManifestInfo:
    """``manifest.json``: what ``manifest.parquet`` covers."""

    parts: dict[str, str]  # part key -> version merged
    rows: int  # images (one row each)
    counts: dict[str, int]  # images per status
    latest: int = _NO_TIME  # the latest encoded_at of any row read (µs since the epoch)
    digest: str = ""  # of ``parts``; the Parquet file carries the same
    merged_at: float = field(default_factory=time.time)
    format: int = FORMAT

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ManifestInfo:
        return cls(**json.loads(data))


def parts_digest(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(parts.items())).encode()).hexdigest()[:32]


def read_info(storage: Storage) -> ManifestInfo | None:
    """``manifest.json``, or None when the destination was never merged (or by a version
    that wrote ``manifest.csv``)."""
    try:
        info = ManifestInfo.from_json(storage.get(MANIFEST_INFO_KEY))
    except (KeyError, ValueError, TypeError):
        return None
    return info if info.format == FORMAT else None


# --- the rule, on Arrow tables ----------------------------------------------------------
def with_order(table: Any, seq_start: int) -> Any:
    """``table`` plus what the rule sorts on: ``_presence`` (ok or deleted), ``_time``
    (µs, rows without a time first) and ``_seq`` (the order rows were seen in)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    presence = pc.is_in(table["status"], value_set=pa.array([OK, DELETED]))
    when = pc.fill_null(table["encoded_at"].cast(pa.int64()), _NO_TIME)
    seq = pa.array(np.arange(seq_start, seq_start + table.num_rows, dtype=np.int64))
    return (
        table.append_column("_presence", presence)
        .append_column("_time", when)
        .append_column("_seq", seq)
    )


def _sorted(table: Any) -> Any:
    keys = [("id", "ascending"), ("_presence", "ascending"), ("_time", "ascending")]
    return table.sort_by([*keys, ("_seq", "ascending")])


def _last_of_each_kind(table: Any) -> Any:
    """Of a sorted table, the last row of each (id, kind): the latest ok/deleted and the
    latest failure of every id (ties: the row seen last)."""
    import numpy as np

    n = table.num_rows
    if n < 2:
        return table
    ids = table["id"]
    presence = table["_presence"].to_numpy()
    same = _equal_to_next(ids) & (presence[:-1] == presence[1:])
    return table.filter(np.append(~same, True))


def _equal_to_next(ids: Any) -> Any:
    import pyarrow.compute as pc

    n = len(ids)
    return pc.equal(ids.slice(0, n - 1), ids.slice(1)).to_numpy(zero_copy_only=False)


def _winners(table: Any) -> Any:
    """Of a sorted table reduced by ``_last_of_each_kind`` (per id: the latest failure,
    then the latest ok/deleted), the winning row of each id: ok/deleted unless the
    failure is later than a ``deleted``."""
    import numpy as np
    import pyarrow.compute as pc

    table = _last_of_each_kind(table)
    n = table.num_rows
    if n < 2:
        return table
    pairs = np.flatnonzero(_equal_to_next(table["id"]))  # failure at i, presence at i + 1
    if not len(pairs):
        return table
    keep = np.ones(n, bool)
    ok = pc.equal(table["status"], OK).to_numpy(zero_copy_only=False)
    times = table["_time"].to_numpy()
    presence_wins = ok[pairs + 1] | (times[pairs] <= times[pairs + 1])
    keep[pairs] = ~presence_wins
    keep[pairs + 1] = presence_wins
    return table.filter(keep)


def merged_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The merge rule applied to a few rows in memory (as dicts of a part's columns), one
    row per id in id order: what ``merge_manifest`` keeps of parts holding these rows in
    this order."""
    from encoder.manifest import rows_to_csv

    table = parse_parts([rows_to_csv(rows)])
    if not table.num_rows:
        return []
    winners = _winners(_sorted(with_order(table, 0)))
    return winners.select(list(arrow_schema(with_key=False).names)).to_pylist()


# --- runs and the k-way merge ------------------------------------------------------------
class _RunWriter:
    """Sorted, reduced runs written to temporary Arrow files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []
        self._count = 0

    def write(self, table: Any) -> None:
        self.write_steps(iter([table]))

    def write_steps(self, tables: Iterator[Any]) -> None:
        """One run from sorted tables (each after the one before), written as they come."""
        import pyarrow as pa

        path = self.folder / f"run-{self._count:05d}.arrow"
        self._count += 1
        writer = None
        with pa.OSFile(str(path), "wb") as sink:
            for table in tables:
                if writer is None:
                    writer = pa.ipc.new_file(sink, table.schema)
                writer.write_table(table, max_chunksize=MERGE_BATCH_ROWS)
            if writer is not None:
                writer.close()
        if writer is None:
            path.unlink()
        else:
            self.paths.append(path)

    def fan_in(self) -> None:
        """Merge runs, oldest first, until at most ``MERGE_FAN_IN`` are left (keeping per
        id the latest row of each kind, as a run does), so that the final merge holds
        ``MERGE_FAN_IN`` batches at most, whatever the number of rows."""
        while len(self.paths) > MERGE_FAN_IN:
            group, self.paths = self.paths[:MERGE_FAN_IN], self.paths[MERGE_FAN_IN:]
            self.write_steps(_merge_runs([_read_run(p) for p in group], final=False))
            for path in group:
                path.unlink()


def _read_run(path: Path) -> Iterator[Any]:
    """A run's batches, read (not memory-mapped) one at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


def _read_merged(path: Path, seq: int) -> Iterator[Any]:
    """A previous ``manifest.parquet`` as a run: one row per id, sorted, seen first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(with_key=False)
    for batch in pq.ParquetFile(str(path)).iter_batches(
        batch_size=MERGE_BATCH_ROWS, columns=list(schema.names)
    ):
        table = pa.Table.from_batches([batch]).cast(schema)
        yield with_order(table, seq)


class _Cursor:
    """The rows of one run in hand: always at least two ids, unless the run is done, so
    that a step never splits the rows of an id."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches
        self.rows: Any = None
        self.done = False
        self.fill()

    def fill(self) -> None:
        import pyarrow as pa

        while not self.done and (
            self.rows is None
            or self.rows.num_rows == 0
            or self.rows["id"][0].as_py() == self.rows["id"][-1].as_py()
        ):
            try:
                batch = next(self.batches)
            except StopIteration:
                self.done = True
                break
            self.rows = batch if self.rows is None else pa.concat_tables([self.rows, batch])

    @property
    def empty(self) -> bool:
        return self.rows is None or self.rows.num_rows == 0

    def last_id(self) -> str:
        return self.rows["id"][-1].as_py()

    def take_below(self, bound: str | None) -> Any:
        """The rows whose id is below ``bound`` (all of them for None), removed."""
        import pyarrow.compute as pc

        if bound is None:
            n = self.rows.num_rows
        else:
            n = int(pc.sum(pc.less(self.rows["id"], bound)).as_py() or 0)
        taken, self.rows = self.rows.slice(0, n), self.rows.slice(n)
        return taken


def _merge_runs(runs: Sequence[Iterator[Any]], final: bool = True) -> Iterator[Any]:
    """The winning rows of sorted runs (with ``final``; else the latest row of each kind
    per id, a longer run), in id order, a step at a time."""
    import pyarrow as pa

    cursors = [_Cursor(run) for run in runs]
    while True:
        active = [c for c in cursors if not c.empty]
        if not active:
            return
        still_reading = [c.last_id() for c in active if not c.done]
        bound = min(still_reading) if still_reading else None
        taken = [c.take_below(bound) for c in active]
        for c in active:
            c.fill()
        step = pa.concat_tables([t for t in taken if t.num_rows])
        if step.num_rows:
            yield _winners(_sorted(step)) if final else _last_of_each_kind(_sorted(step))


# --- the merge ----------------------------------------------------------------------------
@dataclass
class _Parsed:
    runs: _RunWriter
    rows_read: int = 0
    earliest: int = 2**63 - 1
    latest: int = _NO_TIME


def _parse_runs(storage: Storage, keys: Sequence[str], runs: _RunWriter, seq: int) -> _Parsed:
    """Parse the parts ``keys`` (in order) into sorted, reduced runs."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    parsed = _Parsed(runs)
    parser = PartParser()

    def flush() -> None:
        nonlocal seq
        table = parser.take()
        if not table.num_rows:
            return
        table = with_order(table, seq)
        seq += table.num_rows
        parsed.rows_read += table.num_rows
        low, high = pc.min_max(table["_time"]).values()
        parsed.earliest = min(parsed.earliest, low.as_py())
        parsed.latest = max(parsed.latest, high.as_py())
        runs.write(_last_of_each_kind(_sorted(table)))

    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for start in range(0, len(keys), FETCH_THREADS):
            for data in pool.map(storage.get, keys[start : start + FETCH_THREADS]):
                parser.add(data)
                if len(parser) >= MERGE_RUN_BYTES:
                    flush()
    flush()
    return parsed


def _scratch(storage: Storage) -> str | None:
    """Where a merge's temporary files go: beside a local destination (the same file
    system as the result), else the system's TMPDIR.  (Readers merge under TMPDIR: a
    destination may be read-only or full.)"""
    if isinstance(storage, LocalStorage):
        storage.root.mkdir(parents=True, exist_ok=True)
        return str(storage.root)
    return None


def merge_into(
    storage: Storage, out: Path, scratch: Path, previous: ManifestInfo | None = None
) -> ManifestInfo:
    """Merge the destination's parts into the Parquet file ``out`` (using ``scratch`` for
    runs), incrementally on ``previous`` when it allows; returns what ``out`` covers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = part_keys(storage)
    runs = _RunWriter(scratch)
    base: Path | None = None
    old = previous.parts if previous else {}
    if previous and old and all(parts.get(k) == v for k, v in old.items()):
        new_keys = [k for k in parts if k not in old]
        parsed = _parse_runs(storage, new_keys, runs, seq=0)
        if parsed.rows_read == 0 or parsed.earliest >= previous.latest:
            base = _fetch_merged(storage, scratch)
    if base is None:  # a full merge: every part
        runs = _RunWriter(scratch)
        parsed = _parse_runs(storage, list(parts), runs, seq=0)
        latest = parsed.latest
    else:
        latest = max(previous.latest, parsed.latest)  # type: ignore[union-attr]
    runs.fan_in()
    sources = [_read_run(p) for p in runs.paths]
    if base is not None:
        sources.insert(0, _read_merged(base, seq=-(2**62)))
    schema = arrow_schema()
    digest = parts_digest(parts)
    metadata = {b"imgenc": json.dumps({"format": FORMAT, "parts_digest": digest}).encode()}
    counts: dict[str, int] = {}
    rows = 0
    pending: list[Any] = []
    pending_rows = 0
    with pq.ParquetWriter(str(out), schema.with_metadata(metadata), compression="zstd") as writer:

        def write() -> None:
            nonlocal pending_rows
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                pending.clear()
                pending_rows = 0

        for step in _merge_runs(sources) if sources else ():
            table = step.select(list(schema.names[:-1]))
            table = table.append_column("key", pa.array(image_keys(table["id"]))).cast(
                schema.with_metadata(metadata)
            )
            for status, n in _value_counts(table["status"]).items():
                counts[status] = counts.get(status, 0) + n
            rows += table.num_rows
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                write()
        write()
    return ManifestInfo(parts, rows, dict(sorted(counts.items())), latest, digest)


def _value_counts(column: Any) -> dict[str, int]:
    return {p["values"]: p["counts"] for p in column.value_counts().to_pylist()}


def _fetch_merged(storage: Storage, scratch: Path) -> Path | None:
    """The stored ``manifest.parquet`` as a local file (None if it is not there)."""
    if isinstance(storage, LocalStorage):
        path = storage.local_path(MANIFEST_KEY)
        return path if path.exists() else None
    target = scratch / "previous.parquet"
    try:
        storage.get_file(MANIFEST_KEY, target)
    except KeyError:
        return None
    return target


def merge_manifest(storage: Storage) -> ManifestInfo:
    """Merge every part into ``manifest.parquet`` and ``manifest.json`` (each written
    atomically, the Parquet file first); returns ``manifest.json``'s content.  A
    ``manifest.csv`` left by an older version is removed: it would no longer be current."""
    previous = read_info(storage)
    if previous is not None and previous.parts == part_keys(storage):
        if not isinstance(storage, LocalStorage):
            return previous  # manifest.json is written after manifest.parquet
        path = storage.local_path(MANIFEST_KEY)
        if path.exists() and _file_digest(path) == previous.digest:
            return previous  # nothing new since the last merge
    try:
        with tempfile.TemporaryDirectory(prefix=".merge-", dir=_scratch(storage)) as folder:
            scratch = Path(folder)
            out = scratch / "manifest.parquet"
            info = merge_into(storage, out, scratch, previous)
            storage.put_file(MANIFEST_KEY, out)
    except OSError as exc:  # the scratch files (pyarrow's errors are OSErrors too)
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"disk full: could not merge the manifest of {storage.url}") from exc
        raise StorageError(f"could not merge the manifest of {storage.url}: {exc}") from exc
    storage.put(MANIFEST_INFO_KEY, info.to_json())
    storage.delete(LEGACY_MANIFEST_KEY)
    _release_memory()
    return info


def _release_memory() -> None:
    """Hand the merge's buffers back to the system (a worker lives on after its merge)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


# --- reading ------------------------------------------------------------------------------
@contextlib.contextmanager
def merged_manifest_file(storage: Storage) -> Iterator[tuple[Path, ManifestInfo]]:
    """A local Parquet file of the merged manifest and what it covers, for the time of
    the ``with``: ``manifest.parquet`` when it covers the parts there now (fetched first
    from S3), else a merge made now into a temporary file (the destination is not
    written to)."""
    info = read_info(storage)
    if info is not None and info.parts == part_keys(storage):
        if isinstance(storage, LocalStorage):
            path = storage.local_path(MANIFEST_KEY)
            if path.exists() and _file_digest(path) == info.digest:
                yield path, info
                return
        else:
            with tempfile.TemporaryDirectory(prefix="imgenc-manifest-") as folder:
                path = Path(folder) / "manifest.parquet"
                try:
                    storage.get_file(MANIFEST_KEY, path)
                except KeyError:
                    pass
                else:
                    if _file_digest(path) == info.digest:
                        yield path, info
                        return
    with tempfile.TemporaryDirectory(prefix="imgenc-merge-") as folder:
        out = Path(folder) / "merged.parquet"
        merged = merge_into(storage, out, Path(folder), info)
        yield out, merged


def _file_digest(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(str(path)).metadata or {}
        return json.loads(meta.get(b"imgenc", b"{}")).get("parts_digest")
    except (OSError, ValueError):
        return None


def read_manifest(
    dest: str | Path | Storage,
    columns: Sequence[str] | None = None,
    status: str | None = None,
    shards_encoded: bool = False,
) -> Any:
    """The merged manifest of ``dest`` as a pyarrow Table, one row per image, sorted by
    id (``.to_pandas()`` for a DataFrame): ``columns`` only, and only rows of ``status``
    when given.  Reads ``manifest.parquet`` when it is current, else merges the parts.
    ``shards_encoded``: the ``shard`` column dictionary-encoded (a few thousand distinct
    keys: 4 bytes a row instead of the string)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from encoder.storage import open_storage

    storage = open_storage(dest) if isinstance(dest, (str, Path)) else dest
    wanted = list(columns) if columns is not None else None
    with merged_manifest_file(storage) as (path, _):
        file = pq.ParquetFile(str(path), read_dictionary=["shard"] if shards_encoded else None)
        read = wanted if wanted is None or status is None else list({*wanted, "status"})
        tables = []
        for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=read):
            if status is not None:
                batch = batch.filter(pc.equal(batch["status"], status))
            tables.append(batch)
        import pyarrow as pa

        schema = arrow_schema()
        if shards_encoded:
            at = schema.get_field_index("shard")
            schema = schema.set(at, pa.field("shard", pa.dictionary(pa.int32(), pa.string())))
        if read is not None:
            schema = pa.schema([schema.field(c) for c in read])
        table = pa.Table.from_batches(tables, schema=schema) if tables else schema.empty_table()
    return table.select(wanted) if wanted is not None else table


def manifest_batches(
    storage: Storage, columns: Sequence[str], batch_rows: int = ROW_GROUP_ROWS
) -> Iterator[Any]:
    """The merged manifest's ``columns``, a record batch at a time, in id order."""
    import pyarrow.parquet as pq

    with merged_manifest_file(storage) as (path, _):
        yield from pq.ParquetFile(str(path)).iter_batches(
            batch_size=batch_rows, columns=list(columns)
        )
