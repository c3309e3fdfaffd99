"""Parquet tables with fixed-shape tensor columns that any Arrow reader can open.

A tensor column (latents ``mean`` (N, C, H, W), reflow ``x_0``/``x_1``) is stored as Arrow's
canonical ``arrow.fixed_shape_tensor`` extension type, whose storage is a
``fixed_size_list<float>[C*H*W]``. What readers see, with no fewstep installed:

- pyarrow: the extension type; ``FixedShapeTensorArray.to_numpy_ndarray()`` gives (N, C, H, W);
- Ray Data: numpy batches of shape (N, C, H, W) (checked with Ray 2.60);
- pandas: an object column of flat (C*H*W,) arrays; DuckDB: a ``FLOAT[]`` list column.

The schema metadata key ``fewstep.tensor_columns`` repeats each column's shape and dtype as
JSON, so the flat forms can be reshaped by anyone. :func:`table_column_to_numpy` reads this
format back, and also Ray Data's own tensor columns (``ray.data.arrow_tensor*``), registered
or not, and plain list columns of equal lengths.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TENSOR_COLUMNS_KEY = "fewstep.tensor_columns"
EXTENSION_METADATA = b"ARROW:extension:metadata"


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; numpy has no bfloat16
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            raise ValueError(
                f"column {name!r} is bfloat16, which Parquet readers cannot read; cast it to float32 first"
            )
        value = tensor.numpy()
    array = np.asarray(value)
    if array.ndim == 0:
        raise ValueError(f"column {name!r} is a scalar; give one value per row (shape (N, ...))")
    return np.ascontiguousarray(array)


def tensors_to_table(
    columns: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> pa.Table:
    """A table with one row per leading index: 1-D arrays become plain columns, arrays of
    rank >= 2 become fixed-shape tensor columns of their trailing shape.

    ``columns`` maps names to numpy arrays, torch tensors or lists, all of the same length N.
    ``metadata`` (str -> str) is added to the schema metadata.
    """
    if not columns:
        raise ValueError("tensors_to_table needs at least one column")
    arrays: dict[str, pa.Array] = {}
    tensor_columns: dict[str, dict[str, Any]] = {}
    lengths = {}
    for name, value in columns.items():
        array = _to_numpy(name, value)
        lengths[name] = array.shape[0]
        if array.ndim == 1:
            arrays[name] = pa.array(array)
        else:
            # (N, *shape) -> one fixed-shape tensor of `shape` per row
            arrays[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(array)
            tensor_columns[name] = {"shape": list(array.shape[1:]), "dtype": str(array.dtype)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths {lengths}; every column needs one entry per row")
    table = pa.table(arrays)
    extra = {TENSOR_COLUMNS_KEY: json.dumps(tensor_columns, sort_keys=True)} if tensor_columns else {}
    return with_metadata(table, {**extra, **dict(metadata or {})})


def with_metadata(table: pa.Table, metadata: Mapping[str, str]) -> pa.Table:
    """``table`` with ``metadata`` merged into its schema metadata (new keys win)."""
    if not metadata:
        return table
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"table metadata must map str to str; these entries are not: {bad!r:.200}")
    merged = dict(table.schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in metadata.items()})
    return table.replace_schema_metadata(merged)


def table_metadata(table: pa.Table) -> dict[str, str]:
    """The schema metadata as str -> str, without pyarrow's and pandas' own entries."""
    raw = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k not in (b"ARROW:schema", b"pandas")}


def _declared_shape(table: pa.Table, name: str) -> list[int] | None:
    """The per-row shape a column's metadata declares (ours, or Ray Data's), if any."""
    field = table.schema.field(name)
    declared = json.loads((table.schema.metadata or {}).get(TENSOR_COLUMNS_KEY.encode(), b"{}"))
    if name in declared:
        return list(declared[name]["shape"])
    extension = (field.metadata or {}).get(EXTENSION_METADATA)
    if extension:
        try:
            shape = json.loads(extension)
        except ValueError:
            return None
        if isinstance(shape, dict):
            shape = shape.get("shape")
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            return shape
    return None


def table_column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as one numpy array: (N,) for plain columns, (N, *shape) for tensor columns."""
    if name not in table.column_names:
        raise KeyError(f"table has no column {name!r}; its columns are {table.column_names}")
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null entries; tensor columns must be complete")
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    kind = array.type
    if isinstance(kind, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    shape = _declared_shape(table, name)
    if isinstance(kind, pa.ExtensionType):  # e.g. Ray's tensor type, registered in this process
        shape = shape or list(getattr(kind, "shape", None) or [])
        array, kind = array.storage, kind.storage_type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = array.flatten().to_numpy(zero_copy_only=False)
        rows = len(array)
        if not shape:
            sizes = (
                set(array.value_lengths().to_pylist()) if not pa.types.is_fixed_size_list(kind) else {kind.list_size}
            )
            if len(sizes) > 1:
                raise ValueError(
                    f"column {name!r} holds lists of different lengths {sorted(sizes)[:5]}; it is not a tensor column"
                )
            shape = [sizes.pop() if sizes else 0]
        # (N * prod(shape),) -> (N, *shape)
        return values.reshape(rows, *shape)
    return array.to_numpy(zero_copy_only=False)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def parquet_bytes_to_table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
