"""Incremental stages: the output a re-run builds on, and its rows carried over without redoing them.

Ingest and latents grow with the data. When the data grows, a re-run keys a new output (its key
still hashes the new content and the code, so an unchanged dataset is a cache hit as before), but
builds it from the previous output: the rows that did not change are carried over, and only the
new or changed ones are decoded or encoded.

The previous output (:func:`previous_output`) is the newest committed manifest of the same
stage, written by the same code version, whose keyed config equals this run's in every value
but those that only name the data (ingest: the source's fingerprint), and whose inputs include
the ones named (latents: the same VAE). Anything else (another image size, test fraction, VAE
or code) builds from scratch.

Carrying (:func:`carry_parts`) goes part by part: a part whose rows are all kept is copied
inside the store (server-side on S3, the bytes are checked against the old manifest at
commit); a part with some rows dropped is rewritten with the rest; a part with none kept is left
behind. A carried part keeps the ``fewstep.ref`` of the run that wrote it in its metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.errors import StoreError
from infra.manifest import to_jsonable
from infra.store import Manifest, StageWriter, Store

log = logging.getLogger("fewstep.incremental")


def previous_output(
    store: Store,
    stage: str,
    config: Mapping[str, Any],
    code_version: str,
    *,
    ignore: Sequence[str] = (),
    inputs: Sequence[str] = (),
) -> Manifest | None:
    """The newest committed ``stage`` output this run may build on (see the module docstring), or None.

    ``config``: this run's keyed config; ``ignore``: its keys that only name the data;
    ``inputs``: refs the previous output must have had among its inputs.
    """
    wanted = {k: v for k, v in to_jsonable(dict(config), "config").items() if k not in ignore}
    try:
        manifests = store.list_manifests(stage)
    except StoreError as error:  # an unreadable manifest elsewhere: build this one whole, and say so
        log.warning("%s: cannot list earlier outputs (%s); building from scratch", stage, error)
        return None
    for manifest in reversed(manifests):
        same = {k: v for k, v in manifest.config.items() if k not in ignore} == wanted
        if same and manifest.code_version == code_version and set(inputs) <= set(manifest.inputs):
            return manifest
    return None


def part_names(manifest: Manifest, folder: str) -> list[str]:
    """The Parquet parts of ``folder`` in a manifest, as their names under the folder, in order."""
    prefix = folder.rstrip("/") + "/"
    return sorted(n[len(prefix) :] for n in manifest.files if n.startswith(prefix) and n.endswith(".parquet"))


def read_part(store: Store, manifest: Manifest, name: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file of a manifest (checked against it first), only ``columns`` read."""
    (path,) = store.verified_paths(manifest, name)
    return pq.read_table(path, columns=list(columns) if columns else None, filesystem=store.pa_filesystem)


def read_folder(store: Store, manifest: Manifest, folder: str, columns: Sequence[str]) -> pa.Table | None:
    """Every part of ``folder``, ``columns`` only, concatenated; None when it has no parts."""
    tables = [read_part(store, manifest, f"{folder}/{name}", columns) for name in part_names(manifest, folder)]
    return pa.concat_tables(tables) if tables else None


@dataclass(frozen=True)
class Carried:
    """What :func:`carry_parts` took over from the previous output."""

    rows: int  # rows kept (in the first folder)
    dropped: int  # rows left behind
    copied: int  # parts copied whole
    rewritten: int  # parts rewritten without their dropped rows


def carry_parts(
    writer: StageWriter, previous: Manifest, folders: Sequence[str], keep: pa.Array, *, by: str | None = None
) -> Carried:
    """Carry the rows of ``previous`` whose ``id`` is in ``keep`` into ``writer``, part by part.

    ``folders`` hold parts of the same names whose rows line up (ingest's ``images`` and
    ``index``); whether a part is kept whole is read from folder ``by`` (default the first: a
    small table, so the big one is read only when rows must be dropped). A rewritten part is
    named after its first kept id, as :mod:`workers.parts` names parts.
    """
    store = writer.store
    by = by or folders[0]
    rows = dropped = copied = rewritten = 0
    for name in part_names(previous, by):
        ids = read_part(store, previous, f"{by}/{name}", ["id"]).column("id")
        mask = pc.is_in(ids, value_set=keep)
        kept = int(pc.sum(mask).as_py() or 0)
        rows, dropped = rows + kept, dropped + len(ids) - kept
        if kept == len(ids):
            for folder in folders:
                writer.copy_from(previous, f"{folder}/{name}")
            copied += 1
        elif kept:
            first = pc.filter(ids, mask)[0].as_py()
            for folder in folders:
                table = read_part(store, previous, f"{folder}/{name}")
                table = table.filter(pc.is_in(table.column("id"), value_set=keep))
                writer.write_table(f"{folder}/part-{first}.parquet", table)  # its metadata, with this ref
            rewritten += 1
    return Carried(rows, dropped, copied, rewritten)
