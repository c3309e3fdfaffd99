"""Ordered Parquet parts written by Ray Data tasks (workers.parts), and ingest streaming through them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.cards import ImagesCard
from infra.config import IngestConfig
from workers.data import preserved_order
from workers.parts import add_written, bound, first_of_each_id, part_name, write_parts
from workers.stages import s01_ingest as ingest_module
from workers.stages.s01_ingest import run_ingest

pytestmark = pytest.mark.timeout(300)


def test_part_names_sort_like_their_ids():
    assert part_name(7) == "part-000000000007.parquet"
    assert sorted(part_name(i) for i in (100, 9, 12)) == [part_name(i) for i in (9, 12, 100)]
    assert part_name("digits-00012") == "part-digits-00012.parquet"
    with pytest.raises(ValueError, match="cannot name a part file"):
        part_name("a/b")


def test_first_of_each_id_keeps_one_row_per_id_by_tie_break():
    block = pa.table({"id": ["b", "a", "b", "c", "b"], "label": [2, 0, 1, 5, 1], "path": ["x", "y", "z", "w", "a"]})
    out = first_of_each_id(block, tie_break=("label", "path"))
    assert out["id"].to_pylist() == ["a", "b", "c"]
    assert out["path"].to_pylist() == ["y", "a", "w"]  # b: label 1 first, then path "a" before "z"
    assert out["copies"].to_pylist() == [1, 3, 1]


def numbered(batch: pa.Table) -> tuple[dict[str, pa.Table], dict]:
    return {"rows": batch.select(["id", "value"])}, {"total": int(np.sum(batch["value"].to_numpy()))}


def write_all(store, ds, rows: int) -> tuple[object, list[dict]]:
    with store.begin("unit", "parts", config={"rows": rows}) as writer:
        with preserved_order():
            parts = list(write_parts(ds, writer, bound(numbered), rows, {"fewstep.note": "test"}))
        add_written(writer, parts)
        return writer.commit(metrics={}), parts


def test_parts_are_ordered_deterministic_and_independent_of_upstream_blocks(ray_local, tmp_path):
    from infra.store import Store

    digests = []
    for blocks in (1, 7):  # different upstream blocking, same rows
        store = Store.open(str(tmp_path / f"store{blocks}"))
        ds = ray_local.data.range(100, override_num_blocks=blocks).map_batches(
            lambda b: {"id": b["id"], "value": b["id"] * 3}
        )
        manifest, parts = write_all(store, ds, rows=32)
        assert [p["rows"] for p in parts] == [32, 32, 32, 4]
        assert sum(p["total"] for p in parts) == 3 * sum(range(100))
        names = sorted(n for n in manifest.files if n.startswith("rows/"))
        assert names == [f"rows/{part_name(i)}" for i in (0, 32, 64, 96)]
        table = store.read_table(manifest, "rows")
        assert table["id"].to_pylist() == list(range(100))
        assert table.schema.metadata[b"fewstep.note"] == b"test"
        digests.append({n: manifest.files[n].sha256 for n in names})
    assert digests[0] == digests[1]  # byte for byte


def test_rows_out_of_order_fail_the_write(ray_local, tmp_path):
    from infra.store import Store

    store = Store.open(str(tmp_path / "store"))
    ds = ray_local.data.from_items([{"id": i, "value": 1} for i in (0, 1, 5, 3, 4)], override_num_blocks=1)
    with pytest.raises(Exception, match="out of order or duplicated"):
        write_all(store, ds, rows=8)


# --------------------------------------------------------------------------- ingest streams through parts


def ingest_parts(store, config) -> tuple[object, dict[str, str]]:
    manifest = run_ingest(store, config)
    return manifest, {n: e.sha256 for n, e in manifest.files.items() if n.startswith("images/")}


def test_ingest_streams_digits_into_deterministic_parts(ray_local, tmp_path, monkeypatch):
    from infra.store import Store

    monkeypatch.setattr(ingest_module, "rows_per_part", lambda row_bytes: 16)
    config = IngestConfig(source="digits", image_size=8, limit=70, test_fraction=0.25)
    first, parts = ingest_parts(Store.open(str(tmp_path / "a")), config)
    second, again = ingest_parts(Store.open(str(tmp_path / "b")), config)
    assert len(parts) == 5 and parts == again  # 16+16+16+16+6 rows; same bytes in a fresh store
    table = Store.open(str(tmp_path / "a")).read_table(first, "images")
    assert table["id"].to_pylist() == [f"digits-{i:05d}" for i in range(70)]
    card = ImagesCard.from_manifest(first)
    assert card.n_images == 70 and card.n_test == table["split"].to_pylist().count("test") > 0


def test_parquet_ingest_dedupes_across_blocks_and_parts(ray_local, tmp_path, monkeypatch):
    import io

    from PIL import Image

    from infra.store import Store
    from workers.sources.listing import content_id

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    monkeypatch.setattr(ingest_module, "rows_per_part", lambda row_bytes: 8)
    folder = tmp_path / "table"
    folder.mkdir()
    images = [png(i) for i in range(30)]
    # Every image twice, in two files (so the copies start in different blocks), plus one broken row.
    pq.write_table(pa.table({"image": images, "label": [i % 3 for i in range(30)]}), folder / "a.parquet")
    pq.write_table(pa.table({"image": images[::-1] + [b"junk"], "label": [9] * 30 + [0]}), folder / "b.parquet")
    config = IngestConfig(source=str(folder), image_size=8, max_bad_fraction=0.1)
    manifest, parts = ingest_parts(Store.open(str(tmp_path / "a")), config)
    _, again = ingest_parts(Store.open(str(tmp_path / "b")), config)
    assert parts == again and len(parts) == 4  # 8+8+8+6
    table = Store.open(str(tmp_path / "a")).read_table(manifest, "images")
    assert table["id"].to_pylist() == sorted(content_id(d) for d in images)
    # Of two copies the one with the smaller label is kept (ties broken by label, then path).
    assert dict(zip(table["id"].to_pylist(), table["label"].to_pylist())) == {
        content_id(d): i % 3 for i, d in enumerate(images)
    }
    card = ImagesCard.from_manifest(manifest)
    assert (card.n_images, card.duplicates, card.quarantined) == (30, 30, 1)
    limited = run_ingest(Store.open(str(tmp_path / "a")), config.model_copy(update={"limit": 10}))
    got = Store.open(str(tmp_path / "a")).read_table(limited, "images")["id"].to_pylist()
    assert got == sorted(content_id(d) for d in images)[:10]
