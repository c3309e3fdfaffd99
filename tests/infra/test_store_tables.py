"""Tensor tables: readable as tensors by fewstep, and as plain columns by pandas and DuckDB."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from infra.tables import TENSOR_COLUMNS_KEY, table_column_to_numpy, table_metadata, tensors_to_table


def sample_columns(n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "id": np.arange(n, dtype=np.int64),
        "label": rng.integers(0, 10, n),
        "mean": rng.standard_normal((n, 4, 3, 2)).astype(np.float32),
        "x_0": torch.randn(n, 6, dtype=torch.float64),
    }


def test_tensor_columns_round_trip_with_their_shape_and_dtype(tmp_path):
    columns = sample_columns()
    table = tensors_to_table(columns, metadata={"fewstep.vae": "vae/abc"})
    assert isinstance(table.schema.field("mean").type, pa.FixedShapeTensorType)
    assert table.schema.field("id").type == pa.int64()
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    for name, value in columns.items():
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        got = table_column_to_numpy(back, name)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    meta = table_metadata(back)
    assert meta["fewstep.vae"] == "vae/abc"
    assert json.loads(meta[TENSOR_COLUMNS_KEY])["mean"] == {"shape": [4, 3, 2], "dtype": "float32"}


def test_multi_chunk_columns_are_joined():
    table = pa.concat_tables(
        [tensors_to_table({"m": np.ones((2, 2, 2))}), tensors_to_table({"m": np.zeros((3, 2, 2))})]
    )
    assert table.column("m").num_chunks == 2
    got = table_column_to_numpy(table, "m")
    assert got.shape == (5, 2, 2) and got[:2].sum() == 8 and got[2:].sum() == 0


def test_pandas_reads_it_without_fewstep(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(tensors_to_table(sample_columns()), path)
    frame = pd.read_parquet(path)
    assert list(frame["id"]) == [0, 1, 2, 3, 4]
    # Each row is the flat tensor; the schema metadata says how to reshape it.
    shape = json.loads(pq.read_schema(path).metadata[TENSOR_COLUMNS_KEY.encode()])["mean"]["shape"]
    first = np.asarray(frame["mean"].iloc[0]).reshape(shape)
    np.testing.assert_array_equal(first, sample_columns()["mean"][0])


def test_duckdb_reads_it_without_fewstep(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    path = tmp_path / "t.parquet"
    pq.write_table(tensors_to_table(sample_columns()), path)
    rows = duckdb.sql(f"select id, len(mean) as n, mean[1] as first from '{path}' order by id").fetchall()
    expected = sample_columns()["mean"]
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r[1] == 4 * 3 * 2 for r in rows)  # DuckDB sees FLOAT[] lists
    assert all(math.isclose(r[2], float(expected[i].reshape(-1)[0]), rel_tol=1e-6) for i, r in enumerate(rows))


def test_ray_style_tensor_columns_are_read_by_their_metadata():
    # What pyarrow makes of a Ray Data tensor column when Ray is not imported: a list
    # column with Ray's extension name and shape in the field metadata.
    values = np.arange(4 * 6, dtype=np.float32)
    field = pa.field(
        "x",
        pa.list_(pa.float32()),
        metadata={b"ARROW:extension:name": b"ray.data.arrow_tensor_v2", b"ARROW:extension:metadata": b"[2, 3]"},
    )
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, 25, 6), pa.int32()), pa.array(values))
    table = pa.Table.from_arrays([column], schema=pa.schema([field]))
    np.testing.assert_array_equal(table_column_to_numpy(table, "x"), values.reshape(4, 2, 3))
    # A plain list column of equal lengths reads as (N, length).
    plain = pa.table({"y": pa.array([[1, 2], [3, 4], [5, 6]])})
    assert table_column_to_numpy(plain, "y").shape == (3, 2)


def test_bad_tables_get_clear_errors():
    with pytest.raises(ValueError, match="different lengths"):
        tensors_to_table({"a": np.zeros(3), "b": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="bfloat16"):
        tensors_to_table({"a": torch.zeros(2, 2, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="scalar"):
        tensors_to_table({"a": np.float32(1.0)})
    with pytest.raises(KeyError, match="no column 'z'"):
        table_column_to_numpy(tensors_to_table({"a": np.zeros(2)}), "z")
    ragged = pa.table({"y": pa.array([[1, 2], [3]])})
    with pytest.raises(ValueError, match="different lengths"):
        table_column_to_numpy(ragged, "y")
