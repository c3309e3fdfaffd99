"""The features stage: a classifier for labelled images, a self-supervised encoder for unlabelled ones."""

from __future__ import annotations

import numpy as np
import pytest

from infra.cards import FeaturesCard
from infra.config import FeaturesConfig, IngestConfig
from models.encoder import Encoder
from workers.evaluation.scoring import ExtractorSource, Scorer
from workers.pixels import encode_png
from workers.sources.shapes import render_shapes
from workers.stages.s01_ingest import run_ingest
from workers.stages.s09_features import run_features

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def unlabelled(ray_local, local_store, tmp_path):
    """A flat folder of RGB images: no sub-folders, so no labels."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shapes = render_shapes(0, 96, seed=3)
    for i, pixels in enumerate(shapes.pixels):
        (folder / f"img{i:03d}.png").write_bytes(encode_png(pixels))
    return run_ingest(local_store, IngestConfig(source=str(folder), channels=3, image_size=16))


def test_unlabelled_images_get_a_self_supervised_encoder(local_store, unlabelled):
    config = FeaturesConfig(steps=12, batch_size=16, width=8, feature_dim=16, checkpoint_every=6)
    manifest = run_features(local_store, config, unlabelled)
    card = FeaturesCard.from_manifest(manifest)
    assert card.kind == "encoder" and not card.classifies and card.num_classes == 0 and card.test_accuracy is None
    assert card.steps == 12 and card.feature_dim == 16
    assert isinstance(local_store.load_model(manifest, "features"), Encoder)

    # It is a feature space the evaluation scores in: (N, feature_dim), no class logits.
    scorer = Scorer.load(local_store, ExtractorSource("features", manifest.ref), manifest.ref, "cpu")
    scored = scorer.score(render_shapes(100, 8, seed=3).pixels[:, ::2, ::2], np.full(8, -1))
    assert scored.features.shape == (8, 16) and scored.logits is None and np.isfinite(scored.features).all()

    # A classifier cannot be asked for on unlabelled data.
    with pytest.raises(ValueError, match="needs labelled images"):
        run_features(local_store, config.model_copy(update={"kind": "classifier"}), unlabelled)


def test_the_shapes_source_is_deterministic_and_labelled(ray_local, local_store):
    manifest = run_ingest(local_store, IngestConfig(source="shapes", shapes_count=300, channels=3, image_size=32))
    table = local_store.read_table(manifest, "images")
    assert table.num_rows == 300 and sorted(set(table.column("label").to_pylist())) == list(range(10))
    again = render_shapes(7, 1, seed=0)
    first = {i: img for i, img in zip(table.column("id").to_pylist(), table.column("image").to_pylist())}
    from workers.pixels import decode_png

    np.testing.assert_array_equal(decode_png(first["shapes-0000007"], 3), again.pixels[0])
    # Another size or seed is another dataset (and another key).
    other = run_ingest(
        local_store, IngestConfig(source="shapes", shapes_count=300, shapes_seed=1, channels=3, image_size=32)
    )
    assert other.key != manifest.key
