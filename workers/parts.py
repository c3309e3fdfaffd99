"""A Ray Dataset written into a stage's staging folder as ordered Parquet parts, by Ray Data tasks.

    {writer.prefix}/{folder}/part-{first id of the part}.parquet      (one folder per table)

Stages whose output grows with the data (ingest, latents, reflow pairs) stream their rows
through :func:`write_parts`: the dataset, already in id order, is cut into parts of exactly
``rows_per_part`` rows (the last one shorter) and every part is written by the task that holds
it. The driver sees one small stats row per part, never the rows, so its memory stays flat
however large the table grows.

Deterministic: the same rows in the same order give the same parts, byte for byte, whatever
the block sizes upstream or the number of workers. Each part is named after its first id
(zero-padded when ids are integers), so the parts sort like the rows and every reader that
goes through the manifest (:meth:`infra.store.Store.read_table`, :meth:`~infra.store.Store.verified_paths`)
reads them back in order. Rows must arrive sorted by a unique ``id``: each task checks its
part and the driver checks that the parts follow each other, so a broken order fails the
stage instead of committing a table that is not sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.store import StageWriter, Store
from infra.tables import table_to_parquet_bytes, with_metadata

# (tables by folder, extra stats) for one part; a picklable function (module level or partial).
MakeTables = Callable[[pa.Table], tuple[dict[str, pa.Table], dict[str, Any]]]

PART_BYTES = 64 * 2**20  # roughly what one part holds


def rows_per_part(row_bytes: int, least: int = 1024, most: int = 1 << 16) -> int:
    """Rows of about :data:`PART_BYTES` when a row takes ``row_bytes``, within [least, most]."""
    return int(min(most, max(least, PART_BYTES // max(1, row_bytes))))


def part_name(first_id: Any) -> str:
    """``part-<first id>.parquet``; integer ids are zero-padded so names sort like the ids."""
    if isinstance(first_id, (int, np.integer)):
        if first_id < 0:
            raise ValueError(f"part ids must be non-negative integers, got {first_id}")
        return f"part-{int(first_id):012d}.parquet"
    text = str(first_id)
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise ValueError(f"id {text!r} cannot name a part file: ids must be letters, digits, '-', '_' or '.'")
    return f"part-{text}.parquet"


def _check_sorted(ids: pa.ChunkedArray | pa.Array) -> None:
    values = (
        ids.to_numpy(zero_copy_only=False) if isinstance(ids, pa.ChunkedArray) else ids.to_numpy(zero_copy_only=False)
    )
    if len(values) > 1 and not bool(np.all(values[1:] > values[:-1])):
        bad = int(np.flatnonzero(values[1:] <= values[:-1])[0])
        raise RuntimeError(
            f"rows reached the part writer out of order or duplicated: id {values[bad]!r} is followed "
            f"by {values[bad + 1]!r}; the stage must sort by a unique id before writing"
        )


def write_block(batch: pa.Table, store: Store, prefix: str, produced: Mapping[str, str], make: MakeTables) -> pa.Table:
    """Ray Data UDF (one block = one part): write its tables, return one stats row (none if empty)."""
    tables, stats = make(batch)
    if batch.num_rows == 0:  # same columns as a written part's row, so every block has one schema
        return pa.Table.from_pylist(
            [
                {
                    "part": "",
                    "first_id": "",
                    "last_id": "",
                    "first_key": "",
                    "last_key": "",
                    "rows": 0,
                    "folders": "",
                    **stats,
                }
            ]
        ).slice(0, 0)
    _check_sorted(batch["id"])
    first, last = batch["id"][0].as_py(), batch["id"][-1].as_py()
    name = part_name(first)
    written = []
    for folder, table in tables.items():
        if table.num_rows:
            data = table_to_parquet_bytes(with_metadata(table, dict(produced)))
            store.backend.write_bytes(f"{prefix}/{folder}/{name}", data)
            written.append(folder)
    row = {
        "part": name,
        "first_id": str(first),
        "last_id": str(last),
        "first_key": _key(first),
        "last_key": _key(last),
        "rows": batch.num_rows,
        "folders": ",".join(written),
        **stats,
    }
    return pa.Table.from_pylist([row])


def _key(value: Any) -> str:
    """A string that sorts like the id (zero-padded integers)."""
    return f"{int(value):020d}" if isinstance(value, (int, np.integer)) else str(value)


def ordered(ds):
    """``ds`` executed in its rows' order (Ray Data keeps the order only when the dataset's own
    context says so: a dataset copies the context current when it was made, not when it runs)."""
    ds.context.execution_options.preserve_order = True
    return ds


def write_parts(
    ds, writer: StageWriter, make: MakeTables, rows: int, metadata: Mapping[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Write ``ds`` (sorted by a unique ``id``) as parts of ``rows`` rows; yield each part's stats as it lands.

    ``make(part)`` returns ``({folder: table}, stats)``; each non-empty table is written to
    ``folder/part-<first id>.parquet`` with the writer's ref, code version and ``metadata`` in its
    schema metadata. Call :func:`add_written` with what this yielded once it is exhausted.
    """
    produced = {"fewstep.ref": writer.ref, "fewstep.code_version": writer.code_version, **dict(metadata or {})}
    parts = (
        ordered(ds)
        .repartition(target_num_rows_per_block=rows, strict=True)
        .map_batches(
            write_block,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"store": writer.store, "prefix": writer.prefix, "produced": produced, "make": make},
        )
    )
    previous = None
    for stats in parts.iter_rows():
        if previous is not None and not previous["last_key"] < stats["first_key"]:
            raise RuntimeError(
                f"parts {previous['part']} and {stats['part']} overlap or are out of order "
                f"({previous['last_id']!r} then {stats['first_id']!r}); the rows were not sorted by a unique id"
            )
        previous = stats
        yield stats


def add_written(writer: StageWriter, parts: list[dict[str, Any]]) -> set[str]:
    """Add every folder some part was written into to the writer's files; returns those folders."""
    folders = {folder for stats in parts for folder in stats["folders"].split(",") if folder}
    writer.add_files(sorted(folders))
    return folders


def first_of_each_id(batch: pa.Table, tie_break: tuple[str, ...] = ()) -> pa.Table:
    """Ray Data UDF on a block sorted by ``id``: the first row of each run of equal ids (after
    ordering each run by ``tie_break``), with ``copies`` = the run's length.

    Run on the blocks of ``ds.sort("id")`` with ``batch_size=None``: a range-partitioned sort puts
    equal keys in one block (what Ray's own ``groupby(...).map_groups`` relies on), and
    :func:`write_parts` checks that no id repeats across parts.
    """
    if batch.num_rows == 0:
        return batch.append_column("copies", pa.array([], pa.int64()))
    order = pc.sort_indices(batch, sort_keys=[("id", "ascending"), *((c, "ascending") for c in tie_break)])
    batch = batch.take(order)
    ids = batch["id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    copies = np.diff(np.r_[starts, len(ids)])
    return batch.take(pa.array(starts)).append_column("copies", pa.array(copies, pa.int64()))


def bound(function: Callable, **kwargs: Any) -> MakeTables:
    """``function`` with keyword arguments bound (picklable, unlike a lambda)."""
    return partial(function, **kwargs)
