"""Incremental ingest and latents on a real local Ray, on a local folder store and on S3: a re-run
on a grown or changed source decodes and encodes only what is new, and ends with the same rows
as a build from scratch."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from drills import kit
from infra.cards import ImagesCard, LatentsCard
from infra.config import IngestConfig, LatentsConfig, Resources
from infra.store import Store
from infra.tables import table_column_to_numpy
from workers.sources.listing import content_id
from workers.stages.s01_ingest import assign_split, run_ingest
from workers.stages.s03_latents import run_latents

SIZE = 16


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def write(root, rel: str, seed: int, mtime: float = 1_700_000_000.0) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(seed))
    os.utime(path, (mtime, mtime))


def rows(store: Store, manifest, name: str = "images") -> dict[str, dict]:
    return {row["id"]: row for row in store.read_table(manifest, name).to_pylist()}


def grow(root) -> None:
    """Week two: 4 new images, a/0.png changed, b/5.png removed."""
    for k in range(4):
        write(root, f"{'ab'[k % 2]}/new{k}.png", seed=100 + k)
    write(root, "a/0.png", seed=999, mtime=1_800_000_000.0)
    (root / "b" / "5.png").unlink()


@pytest.fixture
def week_one(tmp_path):
    root = tmp_path / "photos"
    for k in range(12):
        write(root, f"{'ab'[k // 6]}/{k % 6}.png", seed=k)
    return root


def test_a_grown_folder_decodes_only_its_new_and_changed_images(ray_local, store, week_one, tmp_path):
    config = IngestConfig(source=str(week_one), image_size=SIZE, test_fraction=0.3)
    first = run_ingest(store, config)
    assert ImagesCard.from_manifest(first).decoded == 12 and ImagesCard.from_manifest(first).reused == 0
    before = rows(store, first)

    grow(week_one)
    second = run_ingest(store, config)
    card = ImagesCard.from_manifest(second)
    assert second.ref != first.ref
    assert (card.decoded, card.reused, card.removed, card.previous_ref) == (5, 10, 1, first.ref)
    after = rows(store, second)
    assert card.n_images == len(after) == 15 and card.n_test + card.n_train == 15
    assert content_id("b/5.png") not in after  # removed images leave the dataset
    assert after[content_id("a/0.png")]["image"] != before[content_id("a/0.png")]["image"]  # changed: decoded again
    # The split of an image never changes once assigned; new images follow the configured fraction.
    for image_id in before.keys() & after.keys():
        assert after[image_id]["split"] == before[image_id]["split"]
    for image_id in after.keys() - before.keys():
        assert after[image_id]["split"] == assign_split(image_id, 0.3)

    # The same rows as an ingest of the grown folder from scratch.
    scratch = run_ingest(Store.open(str(tmp_path / "scratch")), config)
    assert rows(Store.open(str(tmp_path / "scratch")), scratch) == after
    assert ImagesCard.from_manifest(scratch).n_test == card.n_test

    # Unchanged data: the committed output at once, nothing decoded.
    assert run_ingest(store, config).ref == second.ref


def test_new_parquet_parts_are_the_only_ones_read(ray_local, local_store, tmp_path):
    root = tmp_path / "table"
    root.mkdir()

    def part(name: str, seeds: list[int]) -> None:
        table = pa.table({"image": [png(s) for s in seeds], "label": [s % 3 for s in seeds]})
        pq.write_table(table, root / name)

    part("part-0.parquet", [0, 1, 2, 3])
    part("part-1.parquet", [4, 5, 6, 7])
    config = IngestConfig(source=str(root), image_size=SIZE, label_column="label", test_fraction=0.25)
    first = run_ingest(local_store, config)
    part("part-2.parquet", [8, 9, 3])  # 3 is already in part-0: a duplicate, kept once
    second = run_ingest(local_store, config)
    card = ImagesCard.from_manifest(second)
    assert (card.decoded, card.reused, card.removed, card.duplicates) == (3, 8, 0, 1)
    scratch_store = Store.open(str(tmp_path / "scratch"))
    scratch = run_ingest(scratch_store, config)
    assert rows(local_store, second) == rows(scratch_store, scratch)
    assert ImagesCard.from_manifest(scratch).duplicates == 1
    assert second.ref != first.ref


def test_latents_encode_only_the_rows_the_previous_output_lacks(ray_local, store, week_one, tmp_path):
    config = IngestConfig(source=str(week_one), image_size=SIZE, test_fraction=0.3)
    latents_config = LatentsConfig(batch_size=4, resources=Resources(workers=1, cpus=0.5))
    first_images = run_ingest(store, config)
    vae = kit.commit_vae(store, [], metrics=kit.vae_card(latent_scale=1.5))
    first = run_latents(store, latents_config, first_images, vae)
    assert LatentsCard.from_manifest(first).encoded == 12

    grow(week_one)
    images = run_ingest(store, config)
    second = run_latents(store, latents_config, images, vae)
    card = LatentsCard.from_manifest(second)
    assert (card.encoded, card.reused, card.previous_ref) == (5, 10, first.ref)  # 4 new, a/0.png changed
    assert card.n_latents == 15 and card.n_test == ImagesCard.from_manifest(images).n_test

    # Every row, matching an encode of the same images from scratch.
    scratch = run_latents(store, LatentsConfig(batch_size=5, resources=Resources(workers=1, cpus=0.5)), images, vae)
    assert LatentsCard.from_manifest(scratch).encoded == 15
    got, want = store.read_table(second, "latents"), store.read_table(scratch, "latents")
    order_got, order_want = np.argsort(got["id"].to_numpy()), np.argsort(want["id"].to_numpy())
    assert got["id"].to_numpy()[order_got].tolist() == sorted(rows(store, images))
    for column in ("split", "label"):
        assert got[column].to_numpy()[order_got].tolist() == want[column].to_numpy()[order_want].tolist()
    for column in ("mean", "logvar"):
        np.testing.assert_allclose(
            table_column_to_numpy(got, column)[order_got], table_column_to_numpy(want, column)[order_want], atol=1e-5
        )
    assert run_latents(store, latents_config, images, vae).ref == second.ref


def test_carried_parts_are_copied_whole_or_rewritten_and_checked(store):
    """No Ray: :func:`carry_parts` on a committed output with two parts, on a folder and on S3."""
    from infra.errors import IntegrityError
    from workers.incremental import carry_parts, previous_output

    with store.begin("rows", "k1", config={"n": 1, "data": "a"}) as writer:
        writer.write_table("t/part-a.parquet", pa.table({"id": ["a", "b"], "x": [1, 2]}))
        writer.write_table("t/part-c.parquet", pa.table({"id": ["c", "d"], "x": [3, 4]}))
        old = writer.commit()
    assert previous_output(store, "rows", {"n": 1, "data": "b"}, old.code_version, ignore=("data",)) == old
    assert previous_output(store, "rows", {"n": 2, "data": "b"}, old.code_version, ignore=("data",)) is None
    assert previous_output(store, "rows", {"n": 1, "data": "b"}, "other code", ignore=("data",)) is None

    with store.begin("rows", "k2", config={}) as writer:
        carried = carry_parts(writer, old, ("t",), pa.array(["a", "b", "d"]))
        new = writer.commit()
    assert (carried.rows, carried.dropped, carried.copied, carried.rewritten) == (3, 1, 1, 1)
    assert sorted(new.files) == ["t/part-a.parquet", "t/part-d.parquet"]
    assert new.files["t/part-a.parquet"].sha256 == old.files["t/part-a.parquet"].sha256  # copied, not rewritten
    assert store.read_table(new, "t").to_pydict() == {"id": ["a", "b", "d"], "x": [1, 2, 4]}

    # A damaged part is not carried on: the copy must match the old manifest.
    store.backend.write_bytes(f"{store.stage_dir('rows', 'k1')}/{old.files['t/part-a.parquet'].path}", b"junk")
    with pytest.raises(IntegrityError):
        with store.begin("rows", "k3", config={}) as writer:
            writer.copy_from(old, "t/part-a.parquet")
            writer.commit()
