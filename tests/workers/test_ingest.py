"""The ingest stage on tiny real data with a real local Ray: digits, an image folder, Parquet."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.cards import ImagesCard
from infra.config import ConfigError, IngestConfig, StageInputError
from workers.pixels import (
    UnsupportedPixels,
    decode_png,
    encode_png,
    from_model_range,
    prepare_image,
    resize_center_crop,
    to_model_range,
)
from workers.sources.files import MAX_CLASSES
from workers.sources.listing import content_id
from workers.stages import s01_ingest as ingest_module
from workers.stages.s01_ingest import assign_split, run_ingest


def png_bytes(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def wide_image(array: np.ndarray, fmt: str) -> bytes:
    """A 16-bit (uint16), 32-bit integer (int32) or float32 grayscale image, encoded as ``fmt``."""
    return encoded(Image.fromarray(array), fmt)


def jpeg_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- image helpers


def test_resize_center_crop_keeps_the_middle_of_the_longer_side():
    # 40 x 20, left half black, right half white, a red column in the middle
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    out = resize_center_crop(Image.fromarray(pixels), 10)
    assert out.size == (10, 10)
    # shorter side 20 -> 10, so 40 -> 20 wide; the crop keeps columns 5..15 of the 20
    array = np.asarray(out)
    assert array[:, 0].mean() < 40 and array[:, -1].mean() > 215


def test_png_and_model_range_round_trip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    decoded = np.stack([decode_png(encode_png(p), 3) for p in pixels])
    np.testing.assert_array_equal(decoded, pixels)
    x = to_model_range(pixels)
    assert x.shape == (2, 3, 6, 6) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(from_model_range(x), pixels)
    assert decode_png(encode_png(pixels[0]), 1).shape == (6, 6, 1)  # RGB -> L on request


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_rescaled_by_their_type_range_not_clipped(fmt):
    # A dark-to-mid 16-bit ramp: PIL's convert("L") would clip everything above 255 to white.
    v = np.linspace(0, 40000, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    data = wide_image(v, fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = np.asarray(prepare_image(data, 8, 1))
    np.testing.assert_array_equal(got, np.rint(v / 257.0).astype(np.uint8))  # u = round(v / 257)
    assert got.max() == 156 and got.min() == 0  # 40000 / 257, not 255
    rgb = np.asarray(prepare_image(data, 8, 3))
    np.testing.assert_array_equal(rgb[:, :, 0], got)
    # Big-endian 16-bit (I;16B) reads the same.
    big = Image.frombytes("I;16B", (8, 8), v.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(prepare_image(encoded(big, "TIFF"), 8, 1)), got)


def test_32_bit_integer_and_float_images_are_rescaled_or_refused():
    ints = np.array([[0, 257, 65535, 25700]] * 4, dtype=np.int32)
    got = np.asarray(prepare_image(wide_image(ints, "TIFF"), 4, 1))
    assert Image.open(io.BytesIO(wide_image(ints, "TIFF"))).mode == "I"
    np.testing.assert_array_equal(got[0], [0, 1, 255, 100])

    floats = np.array([[0.0, 0.5, 1.0, 0.2]] * 4, dtype=np.float32)
    got = np.asarray(prepare_image(wide_image(floats, "TIFF"), 4, 1))
    np.testing.assert_array_equal(got[0], [0, 128, 255, 51])  # u = round(255 v)

    with pytest.raises(UnsupportedPixels, match=r"float pixels span \[-2, 7\.5\], outside \[0, 1\]"):
        prepare_image(wide_image(np.array([[-2.0, 7.5]], dtype=np.float32), "TIFF"), 4, 1)
    with pytest.raises(UnsupportedPixels, match="NaN or infinity"):
        prepare_image(wide_image(np.array([[0.5, np.nan]], dtype=np.float32), "TIFF"), 4, 1)
    with pytest.raises(UnsupportedPixels, match=r"span \[-5, 70000\], outside 0..65535"):
        prepare_image(wide_image(np.array([[-5, 70000]], dtype=np.int32), "TIFF"), 4, 1)


# --------------------------------------------------------------------------- digits


def test_digits_ingest_is_deterministic_and_reused(ray_local, store, monkeypatch):
    from sklearn.datasets import load_digits

    config = IngestConfig(source="digits", image_size=16, limit=64, test_fraction=0.25)
    manifest = run_ingest(store, config)
    table = store.read_table(manifest, "images")

    assert table.num_rows == 64
    assert table.column("id").to_pylist() == [f"digits-{i:05d}" for i in range(64)]
    np.testing.assert_array_equal(table.column("label").to_numpy(), load_digits().target[:64])
    assert set(table.column("width").to_pylist()) == {16} and set(table.column("height").to_pylist()) == {16}
    first = decode_png(table.column("image")[0].as_py(), 1)
    assert first.shape == (16, 16, 1) and first.max() > 200 and first.min() < 30  # real ink on paper

    splits = table.column("split").to_pylist()
    assert splits == [assign_split(i, 0.25) for i in table.column("id").to_pylist()]
    assert ImagesCard.from_manifest(manifest).n_train == splits.count("train") > 0
    assert ImagesCard.from_manifest(manifest).n_test == splits.count("test") > 0
    assert ImagesCard.from_manifest(manifest).num_classes == 10 and ImagesCard.from_manifest(manifest).quarantined == 0
    assert store.read_table(manifest, "quarantine").num_rows == 0

    # Same config and source: the committed manifest comes back without any work.
    def must_not_run(*args, **kwargs):
        raise AssertionError("ingest recomputed a committed stage")

    monkeypatch.setattr(ingest_module, "raw_dataset", must_not_run)
    assert run_ingest(store, config).digest == manifest.digest
    monkeypatch.undo()

    # A smaller limit keeps every shared image on the same side of the split.
    smaller = store.read_table(run_ingest(store, config.model_copy(update={"limit": 32})), "images")
    assert smaller.column("split").to_pylist() == splits[:32]


# --------------------------------------------------------------------------- image folders


def make_folder(root, bad: int) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "deeper").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(png_bytes(20, 30, "RGB", seed=1))
    (root / "cat" / "b.png").write_bytes(png_bytes(16, 16, "L", seed=2))
    (root / "cat" / "c.jpg").write_bytes(jpeg_bytes(32, 24))
    (root / "dog" / "d.png").write_bytes(png_bytes(40, 17, "RGBA", seed=3))
    (root / "dog" / "deeper" / "e.png").write_bytes(png_bytes(8, 8, "RGB", seed=4))
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    (root / ".hidden.png").write_text("ignored too")
    broken = [
        ("truncated.png", png_bytes(30, 30, "RGB", seed=5)[:60]),
        ("text.png", b"this is not a png at all\n"),
        ("empty.jpg", b""),
    ]
    for name, data in broken[:bad]:
        (root / "dog" / name).write_bytes(data)


def test_folder_ingest_quarantines_broken_files(ray_local, local_store, tmp_path):
    store = local_store
    make_folder(tmp_path / "images", bad=2)
    config = IngestConfig(source=str(tmp_path / "images"), image_size=16, channels=3, max_bad_fraction=0.5)
    manifest = run_ingest(store, config)
    table = store.read_table(manifest, "images").to_pandas()
    quarantine = store.read_table(manifest, "quarantine").to_pandas()

    assert len(table) == 5 and ImagesCard.from_manifest(manifest).n_images == 5
    expected = {
        content_id(rel): label
        for rel, label in [
            ("cat/a.png", 0),
            ("cat/b.png", 0),
            ("cat/c.jpg", 0),
            ("dog/d.png", 1),
            ("dog/deeper/e.png", 1),
        ]
    }
    assert dict(zip(table["id"], table["label"])) == expected
    assert ImagesCard.from_manifest(manifest).num_classes == 2
    for data in table["image"]:
        assert decode_png(data, 3).shape == (16, 16, 3)
        assert Image.open(io.BytesIO(data)).mode == "RGB"

    assert sorted(os.path.basename(p) for p in quarantine["path"]) == ["text.png", "truncated.png"]
    assert all(reason.startswith("not a readable image") for reason in quarantine["reason"])
    assert ImagesCard.from_manifest(manifest).quarantined == 2
    card = ImagesCard.from_manifest(manifest)
    assert card.skipped == 2 and card.skipped_examples == (
        ".hidden.png: hidden name (starts with '.' or '_')",
        "dog/notes.txt: extension '.txt': not an image (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)",
    )


def test_folder_ingest_rescales_wide_images_and_counts_what_it_skips(ray_local, local_store, tmp_path):
    root = tmp_path / "wide"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "_drafts").mkdir()
    (root / "a" / "sixteen.png").write_bytes(wide_image(np.full((12, 12), 40000, np.uint16), "PNG"))
    (root / "a" / "float.tif").write_bytes(wide_image(np.full((12, 12), 0.25, np.float32), "TIFF"))
    (root / "b" / "ok.png").write_bytes(png_bytes(12, 12, "L", seed=1))
    (root / "b" / "hdr.tif").write_bytes(wide_image(np.full((12, 12), 3.5, np.float32), "TIFF"))
    for name in ("a/photo.heic", "a/photo.avif", "b/.DS_Store", "_drafts/c.png", "b/_x.png", "README"):
        (root / name).write_bytes(b"not read")
    manifest = run_ingest(local_store, IngestConfig(source=str(root), image_size=8, max_bad_fraction=0.5))
    card = ImagesCard.from_manifest(manifest)
    images = local_store.read_table(manifest, "images").to_pandas().set_index("id")
    pixels = {rel: decode_png(images.loc[content_id(rel), "image"], 1) for rel in ("a/sixteen.png", "a/float.tif")}
    assert set(np.unique(pixels["a/sixteen.png"])) == {156}  # round(40000 / 257), not white
    assert set(np.unique(pixels["a/float.tif"])) == {64}  # round(0.25 * 255), not black
    quarantine = local_store.read_table(manifest, "quarantine").to_pylist()
    assert [os.path.basename(q["path"]) for q in quarantine] == ["hdr.tif"]
    assert "float pixels span [3.5, 3.5], outside [0, 1]" in quarantine[0]["reason"]
    assert card.n_images == 3 and card.quarantined == 1
    assert card.skipped == 6, card.skipped_examples
    assert card.skipped_examples == (
        "README: no extension: not an image (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)",
        "_drafts/c.png: hidden name (starts with '.' or '_')",
        "a/photo.avif: extension '.avif': not an image (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)",
    )


def test_too_many_broken_files_fail_clearly_and_commit_nothing(ray_local, local_store, tmp_path):
    store = local_store
    make_folder(tmp_path / "images", bad=3)
    config = IngestConfig(source=str(tmp_path / "images"), image_size=16, max_bad_fraction=0.2)
    with pytest.raises(StageInputError) as error:
        run_ingest(store, config)
    message = str(error.value)
    assert "3 of 8 images" in message and "max_bad_fraction=0.2" in message
    assert "not a readable image" in message
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line, flows do not retry
    assert store.list_manifests("ingest") == []


def test_unlabeled_folder_and_new_files_make_a_new_key(ray_local, local_store, tmp_path):
    store = local_store
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png_bytes(12, 12, "L", seed=i))
    config = IngestConfig(source=str(folder), image_size=8)
    first = run_ingest(store, config)
    table = store.read_table(first, "images")
    assert table.num_rows == 4
    assert set(table.column("label").to_pylist()) == {-1} and ImagesCard.from_manifest(first).num_classes == 0

    (folder / "4.png").write_bytes(png_bytes(12, 12, "L", seed=4))
    second = run_ingest(store, config)
    assert second.key != first.key
    assert store.read_table(second, "images").num_rows == 5


def test_missing_source_is_a_clear_error(local_store, tmp_path):
    store = local_store
    with pytest.raises(StageInputError, match="does not exist"):
        run_ingest(store, IngestConfig(source=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match="no images"):
        run_ingest(store, IngestConfig(source=str(tmp_path / "empty")))


# --------------------------------------------------------------------------- Parquet


def test_parquet_source_with_string_labels_duplicates_and_a_bad_row(ray_local, local_store, tmp_path):
    store = local_store
    folder = tmp_path / "table"
    folder.mkdir()
    images = [png_bytes(24, 24, "L", seed=i) for i in range(5)]
    pq.write_table(
        pa.table({"img": images[:3], "kind": ["zero", "one", "zero"], "extra": [1, 2, 3]}),
        folder / "part-0.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "img": [images[3], images[4], images[0], b"garbage"],
                "kind": ["two", None, "zero", "one"],
                "extra": [4, 5, 6, 7],
            }
        ),
        folder / "part-1.parquet",
    )
    config = IngestConfig(
        source=str(folder), image_column="img", label_column="kind", image_size=8, max_bad_fraction=0.2
    )
    manifest = run_ingest(store, config)
    table = store.read_table(manifest, "images").to_pandas()

    # images[0] appears twice: one row. "garbage" is quarantined. Labels: sorted names.
    assert ImagesCard.from_manifest(manifest).duplicates == 1 and ImagesCard.from_manifest(manifest).quarantined == 1
    labels = dict(zip(table["id"], table["label"]))
    assert labels == {
        content_id(images[0]): 2,
        content_id(images[1]): 0,
        content_id(images[2]): 2,
        content_id(images[3]): 1,
        content_id(images[4]): -1,
    }
    assert ImagesCard.from_manifest(manifest).num_classes == 3
    assert list(table["id"]) == sorted(table["id"])

    with pytest.raises(StageInputError, match="no column 'pixels'"):
        run_ingest(store, config.model_copy(update={"image_column": "pixels"}))


def write_parquet(path, images, labels, label_type=None) -> None:
    labels_array = pa.array(labels, label_type) if label_type is not None else labels
    pq.write_table(pa.table({"image": images, "label": labels_array}), path)


def test_sparse_integer_labels_are_renumbered_not_stretched(ray_local, local_store, tmp_path):
    images = [png_bytes(8, 8, "L", seed=i) for i in range(4)]
    write_parquet(tmp_path / "sparse.parquet", images, [0, 2_000_000_000, None, -1])
    manifest = run_ingest(local_store, IngestConfig(source=str(tmp_path / "sparse.parquet"), image_size=8))
    card = ImagesCard.from_manifest(manifest)
    assert card.num_classes == 2 and card.classes == ("0", "2000000000")
    table = local_store.read_table(manifest, "images").to_pandas()
    assert dict(zip(table["id"], table["label"])) == {
        content_id(images[0]): 0,
        content_id(images[1]): 1,
        content_id(images[2]): -1,
        content_id(images[3]): -1,
    }


def test_bad_labels_and_schemas_are_clear_errors_on_any_file(local_store, tmp_path):
    """Checked on the driver, before Ray reads an image: no ray_local needed, nothing committed."""
    images = [png_bytes(8, 8, "L", seed=i) for i in range(3)]
    negative = tmp_path / "negative.parquet"
    write_parquet(negative, images, [1, -7, 2])
    with pytest.raises(StageInputError, match=r"negative labels \[-7\]"):
        run_ingest(local_store, IngestConfig(source=str(negative)))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_parquet(mixed / "part-0.parquet", images, [0, 1, 2])
    write_parquet(mixed / "part-1.parquet", images, ["cat", "dog", "cat"])
    with pytest.raises(StageInputError) as error:
        run_ingest(local_store, IngestConfig(source=str(mixed)))
    assert "is int64 in 'part-0.parquet' but string in 'part-1.parquet'" in str(error.value)

    (mixed / "part-1.parquet").unlink()
    pq.write_table(pa.table({"pixels": images, "label": [0, 1, 2]}), mixed / "part-2.parquet")
    with pytest.raises(StageInputError, match="'part-2.parquet' .* has no column 'image'"):
        run_ingest(local_store, IngestConfig(source=str(mixed)))

    (mixed / "part-2.parquet").unlink()
    pq.write_table(pa.table({"image": images}), mixed / "part-3.parquet")
    with pytest.raises(StageInputError, match="'part-3.parquet' has no label column 'label', but 'part-0.parquet'"):
        run_ingest(local_store, IngestConfig(source=str(mixed)))

    ids = tmp_path / "ids.parquet"
    write_parquet(ids, [b"x"] * (MAX_CLASSES + 1), [f"img-{i}" for i in range(MAX_CLASSES + 1)])
    with pytest.raises(StageInputError, match=f"gives {MAX_CLASSES + 1:,} classes, more than"):
        run_ingest(local_store, IngestConfig(source=str(ids)))
    assert local_store.list_manifests("ingest") == []


def test_label_types_may_differ_in_width_across_files(ray_local, local_store, tmp_path):
    images = [png_bytes(8, 8, "L", seed=i) for i in range(4)]
    folder = tmp_path / "widths"
    folder.mkdir()
    write_parquet(folder / "a.parquet", images[:2], [0, 3], pa.int32())
    write_parquet(folder / "b.parquet", images[2:], [1, None], pa.int64())
    manifest = run_ingest(local_store, IngestConfig(source=str(folder), image_size=8))
    table = local_store.read_table(manifest, "images").to_pandas()
    assert sorted(table["label"]) == [-1, 0, 1, 3] and ImagesCard.from_manifest(manifest).num_classes == 4


# --------------------------------------------------------------------------- sources on S3


def test_s3_folder_and_parquet_sources_use_the_store_settings(ray_local, s3_uri):
    from infra.store import Store

    store = Store.open(s3_uri)
    bucket = s3_uri[len("s3://") :].split("/")[0]
    images = [png_bytes(10, 14, "RGB", seed=i) for i in range(4)]
    for i, data in enumerate(images):
        store.fs.pipe_file(f"{bucket}/folder/{'ab'[i % 2]}/{i}.png", data)
    store.fs.pipe_file(f"{bucket}/folder/b/bad.png", b"nope")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": images, "label": [3, 1, 4, 1]}), buffer)
    store.fs.pipe_file(f"{bucket}/table/data.parquet", buffer.getvalue())

    folder = run_ingest(store, IngestConfig(source=f"s3://{bucket}/folder", image_size=8, max_bad_fraction=0.3))
    assert ImagesCard.from_manifest(folder).n_images == 4 and ImagesCard.from_manifest(folder).quarantined == 1
    assert ImagesCard.from_manifest(folder).num_classes == 2

    table = run_ingest(store, IngestConfig(source=f"s3://{bucket}/table/data.parquet", image_size=8))
    got = store.read_table(table, "images").to_pandas()
    assert dict(zip(got["id"], got["label"])) == {content_id(d): label for d, label in zip(images, [3, 1, 4, 1])}
    assert ImagesCard.from_manifest(table).num_classes == 5  # integer labels: max + 1

    # Overwriting an object changes its ETag: a new key, not last week's result.
    store.fs.pipe_file(f"{bucket}/folder/a/0.png", png_bytes(10, 14, "RGB", seed=99))
    again = run_ingest(store, IngestConfig(source=f"s3://{bucket}/folder", image_size=8, max_bad_fraction=0.3))
    assert again.key != folder.key
