"""The manifest: one row per image, saying what happened to it and where its code is.

Layout of a destination (local directory or S3 prefix)::

    spec.json                 the code spec (encoder.spec.CodeSpec)
    center.npy                the centre (only for --center codes; its SHA-256 is in the spec)
    calibration.npz           the int8 calibration sample (only for int8 codes; hashed likewise)
    planes.npz                the fitted planes (only for --planes codes; hashed likewise)
    codes/<shard>.npy         uint8 (n, bytes_per_code) bit-packed codes, one row per ok image
    parts/<shard>.csv         manifest rows for that shard, written after the shard
    parts/<run>-deleted.csv   ``deleted`` rows: images a ``--resume`` found gone (no shard)
    manifest.parquet          all parts merged: one row per image id, sorted by id
    manifest.json             what the merge covered: the parts and their versions, totals

Workers and runs write small CSV parts, each only after its shard, so a part never names
a code that is not on disk.  The merge (``encoder.merged``) keeps exactly one row per image
id, streaming, in bounded memory:

- ``ok`` and ``deleted`` compete by ``encoded_at`` (for ``deleted``, the time the image
  was seen gone): the later wins, so a photo deleted then restored and encoded again is
  ``ok`` again, and a photo deleted after it was encoded is ``deleted``;
- a failure never beats ``ok`` (a redelivered chunk that failed does not undo a code);
  it beats an earlier ``deleted`` (the photo came back, and could not be encoded);
- among failures, the latest wins.

Among rows of one kind, on equal times the row seen last wins.  Re-running a chunk
rewrites the same shard and part keys, so redelivery never adds rows.  ``deleted`` is not
a failure: the status totals count it apart (``StatusTotals.deleted``).

This module holds the format: the columns, the CSV parts (written with the standard
``csv`` module, read back as Arrow tables), and the status totals.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from encoder.storage import Storage

COLUMNS = (
    "id",
    "path",
    "status",
    "error",
    "sha256",
    "size",
    "mtime_ns",
    "width",
    "height",
    "shard",
    "row",
    "job_id",
    "worker_host",
    "encoded_at",
)
INT_COLUMNS = ("size", "mtime_ns", "width", "height", "row")
SPEC_KEY = "spec.json"
CENTER_KEY = "center.npy"  # the mean feature subtracted before hashing, when --center is used
CALIBRATION_KEY = "calibration.npz"  # the int8 calibration sample, when --precision int8
PLANES_KEY = "planes.npz"  # the fitted planes, when --planes
MANIFEST_KEY = "manifest.parquet"
MANIFEST_INFO_KEY = "manifest.json"
LEGACY_MANIFEST_KEY = "manifest.csv"  # what versions before manifest.parquet merged into
PARTS_PREFIX = "parts"
CODES_PREFIX = "codes"

OK = "ok"
DELETED = "deleted"  # gone from the folder when a --resume scanned it; not a failure

Row = dict[str, str]


def rows_to_csv(rows: Iterable[Row]) -> bytes:
    """A manifest part: the header, then one line per row (missing columns empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return buffer.getvalue().encode("utf-8")


def csv_to_rows(data: bytes) -> list[Row]:
    """A part's rows as dicts of strings (for a look at one part; merging uses Arrow)."""
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def arrow_schema(with_key: bool = True) -> Any:
    """The typed columns of the merged manifest (and of parts read as Arrow): integers for
    sizes, pixels and rows, a UTC timestamp for ``encoded_at``, strings for the rest, and
    the image's ``key`` (``encoder.keys``)."""
    import pyarrow as pa

    fields = []
    for name in COLUMNS:
        if name in INT_COLUMNS:
            fields.append(pa.field(name, pa.int64()))
        elif name == "encoded_at":
            fields.append(pa.field(name, pa.timestamp("us", tz="UTC")))
        else:
            fields.append(pa.field(name, pa.string()))
    if with_key:
        fields.append(pa.field("key", pa.int64()))
    return pa.schema(fields)


class PartParser:
    """Parts' bytes in, Arrow tables of their rows out (``arrow_schema`` without ``key``):
    ``add`` appends a part's rows to one buffer (parts that share a header are parsed in
    one pass, and each part's bytes are copied once), ``take`` parses what is buffered.
    A column a part lacks (written by an older version) is null."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.header = b""
        self.tables: list[Any] = []

    def add(self, data: bytes) -> None:
        newline = data.find(b"\n")
        if newline < 0 or not data[newline + 1 :].strip():
            return  # a header alone: no rows
        header = data[:newline]
        if header != self.header:
            self._parse()
            self.header = header
        if not self.buffer:
            self.buffer += header + b"\n"
        self.buffer += memoryview(data)[newline + 1 :]
        if not data.endswith(b"\n"):
            self.buffer += b"\n"

    def __len__(self) -> int:
        return len(self.buffer)  # bytes buffered

    def _parse(self) -> None:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        if not self.buffer:
            return
        types = {f.name: f.type for f in arrow_schema(with_key=False)}
        types["encoded_at"] = pa.string()  # parse_times: with or without an offset
        convert = pcsv.ConvertOptions(
            column_types=types,
            include_columns=list(COLUMNS),
            include_missing_columns=True,
            strings_can_be_null=False,
        )
        body, self.buffer = self.buffer, bytearray()
        parse = pcsv.ParseOptions(newlines_in_values=True)
        source = pa.BufferReader(pa.py_buffer(body))  # the header, then the rows: no copy
        table = pcsv.read_csv(source, parse_options=parse, convert_options=convert)
        self.tables.append(table.select(list(COLUMNS)))

    def take(self) -> Any:
        """The rows added since the last ``take``, as one table, in the order added."""
        import pyarrow as pa

        self._parse()
        tables, self.tables = self.tables, []
        schema = arrow_schema(with_key=False)
        if not tables:
            return schema.empty_table()
        table = pa.concat_tables(tables)
        at = table.column_names.index("encoded_at")
        return table.set_column(at, "encoded_at", parse_times(table["encoded_at"])).cast(schema)


def parse_parts(datas: Sequence[bytes]) -> Any:
    """The rows of several parts (their bytes, in order) as one Arrow table."""
    parser = PartParser()
    for data in datas:
        parser.add(data)
    return parser.take()


_ISO_TIME = r"^\d{4}-\d\d-\d\d([T ]\d\d(:\d\d(:\d\d(\.\d{1,9})?)?)?)?"
_OFFSET = r"(Z|[+-]\d\d:?\d\d)$"


def parse_times(strings: Any) -> Any:
    """ISO 8601 times (``encoded_at``) as UTC timestamps (µs): with an offset as given,
    without one as UTC; anything else (empty, garbled) is null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    strings = pc.fill_null(strings, "")
    aware = pc.match_substring_regex(strings, _ISO_TIME + _OFFSET)
    naive = pc.match_substring_regex(strings, _ISO_TIME + "$")
    utc = pa.timestamp("us", tz="UTC")
    with_offset = pc.cast(pc.if_else(aware, strings, pa.scalar(None, pa.string())), utc)
    without = pc.cast(pc.if_else(naive, strings, pa.scalar(None, pa.string())), pa.timestamp("us"))
    without = pc.assume_timezone(without, "UTC")
    return pc.if_else(aware, with_offset, without)


def read_parts(storage: Storage, keys: Sequence[str], threads: int = 16) -> Any:
    """The rows of the parts ``keys`` as one Arrow table (``parse_parts``), in key order."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return parse_parts(list(pool.map(storage.get, keys)))


def part_keys(storage: Storage) -> dict[str, str]:
    """``key -> version`` of every manifest part, sorted by key."""
    return {k: v for k, v in storage.list_versions(PARTS_PREFIX).items() if k.endswith(".csv")}


class StatusTotals:
    """Totals of a run or job from its ``counts`` (status -> images), shared by
    ``imgenc encode``'s summary and a distributed job's status."""

    counts: dict[str, int]

    @property
    def processed(self) -> int:
        """Images read and encoded (or failed): ``deleted`` ones are not processed."""
        return sum(n for status, n in self.counts.items() if status != DELETED)

    @property
    def failed(self) -> int:
        """Images that failed; ``deleted`` is not a failure (``--strict`` ignores it)."""
        return sum(n for status, n in self.counts.items() if status not in (OK, DELETED))

    @property
    def deleted(self) -> int:
        """Images recorded ``deleted``: gone from the folder a ``--resume`` scanned."""
        return self.counts.get(DELETED, 0)

    def count_lines(self) -> list[str]:
        return [f"  {status:<14} {n}" for status, n in sorted(self.counts.items())]


def status_counts(statuses: Any) -> dict[str, int]:
    """Images per status, from an Arrow string column (or any iterable of statuses)."""
    if hasattr(statuses, "value_counts"):
        pairs = statuses.value_counts().to_pylist()
        return dict(sorted((p["values"], p["counts"]) for p in pairs))
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))
