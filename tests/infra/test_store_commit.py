"""The store's commit protocol, on a local folder and on a real S3 endpoint (the ``store`` fixture).

Round-trips of every kind of file, content-addressed keys, crash safety, corruption
detection, and two processes racing to commit the same key.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import infra.store
from infra.errors import IntegrityError, InvalidName, NotCommitted, StoreError
from infra.gc import STAGING, clock, plan_gc
from infra.manifest import Manifest
from infra.store import Store
from infra.tables import table_column_to_numpy, tensors_to_table

sys.path.insert(0, os.path.dirname(__file__))
from store_race_worker import ROUNDS, race_worker  # noqa: E402  (spawned children import it by name)

ROOT = Path(__file__).resolve().parents[2]


def latents_table(seed: int = 0, n: int = 6) -> pa.Table:
    rng = np.random.default_rng(seed)
    return tensors_to_table(
        {
            "id": np.arange(n),
            "label": rng.integers(0, 10, n),
            "mean": rng.standard_normal((n, 4, 2, 2)).astype(np.float32),
        }
    )


def commit_simple(
    store: Store, stage: str = "latents", config: dict | None = None, inputs=(), seed: int = 0
) -> Manifest:
    config = config or {"seed": seed}
    key = store.stage_key(stage, config, inputs)
    with store.begin(stage, key, config=config, inputs=inputs) as writer:
        writer.write_table("latents", latents_table(seed))
        return writer.commit({"rows": 6, "loss": 0.25})


# ---------------------------------------------------------------------------------------
# Round-trips


def test_every_kind_of_file_round_trips_and_is_listed(store):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "rng": torch.tensor([1, 2, 255], dtype=torch.uint8),
    }
    key = store.stage_key("vae", {"lr": 1e-3})
    with store.begin("vae", key, config={"lr": 1e-3}) as writer:
        writer.write_table("latents", latents_table(), metadata={"fewstep.vae_digest": "abc"})
        writer.write_tensors("state", tensors, metadata={"note": {"x": 1}})
        writer.write_bytes("grid.png", b"\x89PNG fake")
        writer.write_json("curve", {"loss": [1.0, 0.5]})
        manifest = writer.commit({"latent_scale": 0.5})

    assert manifest.ref == f"vae/{key}" and manifest.config == {"lr": 1e-3}
    assert manifest.metrics == {"latent_scale": 0.5}
    assert set(manifest.files) == {"latents", "state", "grid.png", "curve"}
    assert manifest.files["latents"].path.endswith(".parquet")
    assert all(len(entry.sha256) == 64 and entry.size > 0 for entry in manifest.files.values())

    table = store.read_table(manifest, "latents")
    assert table_column_to_numpy(table, "mean").shape == (6, 4, 2, 2)
    np.testing.assert_array_equal(table_column_to_numpy(table, "mean"), table_column_to_numpy(latents_table(), "mean"))
    meta = table.schema.metadata
    assert meta[b"fewstep.ref"] == manifest.ref.encode() and meta[b"fewstep.vae_digest"] == b"abc"
    assert meta[b"fewstep.code_version"] == infra.CODE_VERSION.encode()
    read = store.read_tensors(manifest, "state")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert store.read_bytes(manifest, "grid.png") == b"\x89PNG fake"
    assert store.read_json(manifest, "curve") == {"loss": [1.0, 0.5]}

    assert store.get("vae", key) == manifest
    assert store.get_ref(manifest.ref) == manifest
    assert [m.ref for m in store.list_manifests()] == [manifest.ref]
    assert store.list_manifests("vae") == [manifest] and store.list_manifests("base") == []
    # What Ray Data does: read the file straight from the filesystem the store hands out.
    direct = pq.read_table(store.file_path(manifest, "latents"), filesystem=store.pa_filesystem)
    assert direct.equals(table)
    store.verify(manifest)


def test_files_written_by_others_under_the_prefix_are_committed(store):
    key = store.stage_key("latents", {"parts": 2})
    with store.begin("latents", key, config={"parts": 2}) as writer:
        # As Ray Data's write_parquet would: several files in a folder under the attempt prefix.
        store.pa_filesystem.create_dir(f"{writer.prefix}/latents")
        for i in range(2):
            pq.write_table(
                latents_table(seed=i), f"{writer.prefix}/latents/part-{i}.parquet", filesystem=store.pa_filesystem
            )
        writer.add_files(["latents"])
        manifest = writer.commit()
    assert sorted(manifest.files) == ["latents/part-0.parquet", "latents/part-1.parquet"]
    assert store.read_table(manifest, "latents").num_rows == 12
    folder = store.file_path(manifest, "latents")
    assert pq.read_table(folder, filesystem=store.pa_filesystem).num_rows == 12


@dataclass(frozen=True)
class TinyConfig:
    features: int = 3
    classes: int = 2


class TinyNet(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.body = nn.Linear(config.features, config.classes)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.body(x) * self.scale


class Wrapper(nn.Module):
    """Stands in for DDP ("module.") and torch.compile ("_orig_mod.")."""

    def __init__(self, name: str, inner: nn.Module):
        super().__init__()
        self.add_module(name, inner)


def test_models_round_trip_through_safetensors_and_the_registry(store):
    from models.registry import model_spec, register_kind

    register_kind("store-test-tiny", TinyConfig, TinyNet)
    net = TinyNet(TinyConfig(features=5, classes=3))
    spec = model_spec(net)
    key = store.stage_key("base", {"n": 1})
    with store.begin("base", key, config={"n": 1}) as writer:
        writer.write_model("model", Wrapper("module", Wrapper("_orig_mod", net)), spec)
        manifest = writer.commit()
    assert {"model", "model.json"} <= set(manifest.files)
    assert store.read_json(manifest, "model.json") == spec
    assert set(store.read_tensors(manifest, "model")) == {"body.weight", "body.bias", "scale"}

    rebuilt = store.load_model(manifest, "model")
    assert isinstance(rebuilt, TinyNet) and rebuilt.config == net.config
    x = torch.randn(4, 5)
    assert torch.equal(rebuilt(x), net(x))

    with store.begin("base", "other", config={}) as writer:  # a spec that does not fit the weights
        writer.write_model("model", net, {"kind": "store-test-tiny", "config": {"features": 2, "classes": 3}})
        wrong = writer.commit()
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        store.load_model(wrong, "model")


def test_nothing_in_infra_unpickles():
    sources = "\n".join(path.read_text() for path in (ROOT / "infra").glob("*.py"))
    assert "torch.load(" not in sources and "pickle.load" not in sources


# ---------------------------------------------------------------------------------------
# Keys and lineage


def test_stage_key_hashes_stage_config_inputs_and_code_version(store, monkeypatch):
    upstream = commit_simple(store, "ingest", seed=1)
    other = commit_simple(store, "ingest", seed=2)
    key = store.stage_key("vae", {"lr": 0.1, "steps": 3}, [upstream])
    assert key == store.stage_key("vae", {"steps": 3, "lr": 0.1}, [upstream])  # key order is irrelevant
    assert key != store.stage_key("vae", {"lr": 0.2, "steps": 3}, [upstream])
    assert key != store.stage_key("vae", {"lr": 0.1, "steps": 3}, [other])
    assert key != store.stage_key("latents", {"lr": 0.1, "steps": 3}, [upstream])
    monkeypatch.setattr(infra.store, "CODE_VERSION", "0.0.0+other")
    assert key != store.stage_key("vae", {"lr": 0.1, "steps": 3}, [upstream])


def test_manifest_records_lineage_and_is_self_checking(store):
    upstream = commit_simple(store, "ingest")
    child = commit_simple(store, "vae", inputs=[upstream])
    assert child.inputs == [upstream.ref]
    assert child.input_digests == {upstream.ref: upstream.digest}
    assert child.code_version == infra.CODE_VERSION and child.created_at.endswith("Z")
    assert child.digest == child.content_digest()
    assert Manifest.from_json(child.to_json(), "test") == child


def test_committed_key_is_returned_not_recomputed(store):
    first = commit_simple(store)
    again = store.get(first.stage, first.key)
    assert again == first
    # A second writer of the same key gets the committed manifest back, not its own.
    with store.begin(first.stage, first.key, config={"seed": 0}) as writer:
        writer.write_table("latents", latents_table(seed=9))
        assert writer.commit({"rows": 1}) == first


def test_bad_names_and_refs_are_refused(store):
    with pytest.raises(InvalidName, match="'../x'"):
        store.begin("../x", "k", config={})
    with pytest.raises(InvalidName, match="not 'stage/key'"):
        store.get_ref("nokey")
    with pytest.raises(NotCommitted, match="latents/0123"):
        store.get_ref("latents/0123")
    with store.begin("s", "k", config={}) as writer:
        with pytest.raises(InvalidName, match="relative path"):
            writer.write_bytes("/abs", b"")
        writer.write_bytes("a", b"1")
        with pytest.raises(InvalidName, match="unique"):
            writer.write_bytes("a", b"2")
        manifest = writer.commit()
    with pytest.raises(NotCommitted, match="no file 'b'"):
        store.read_bytes(manifest, "b")


def test_leaving_a_writer_without_commit_is_an_error(store):
    with pytest.raises(StoreError, match="without commit"):
        with store.begin("s", "k", config={}) as writer:
            writer.write_bytes("a", b"1")
    assert store.get("s", "k") is None


def test_store_pickles_for_ray_workers(store):
    manifest = commit_simple(store)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == store.uri
    assert clone.read_table(manifest, "latents").num_rows == 6


# ---------------------------------------------------------------------------------------
# Crashes and corruption


def test_crash_before_the_manifest_leaves_nothing_visible_and_a_retry_commits(store, monkeypatch):
    config = {"seed": 0}
    key = store.stage_key("latents", config)
    with pytest.raises(RuntimeError, match="worker died"):
        with store.begin("latents", key, config=config) as writer:
            writer.write_table("latents", latents_table())
            raise RuntimeError("worker died")

    # Power cut inside commit: every file written and verified, the manifest never published.
    def power_cut(path, data):
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        with store.begin("latents", key, config=config) as writer:
            writer.write_table("latents", latents_table())
            monkeypatch.setattr(store.backend, "create_exclusive", power_cut)
            writer.commit()
    monkeypatch.undo()

    assert store.get("latents", key) is None
    assert store.list_manifests() == []
    with pytest.raises(NotCommitted):
        store.get_ref(f"latents/{key}")
    leftovers = [item for item in plan_gc(store, now=clock() + timedelta(hours=2)).items if item.kind == STAGING]
    assert len(leftovers) == 2  # both attempts, and only gc sees them

    manifest = commit_simple(store)
    assert manifest.key == key and store.get("latents", key) == manifest
    assert store.read_table(manifest, "latents").num_rows == 6


def corrupt(store: Store, path: str, transform) -> None:
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, transform(data))


def test_corruption_after_commit_is_detected_and_names_the_file(store):
    manifest = commit_simple(store)
    path = store.file_path(manifest, "latents")

    corrupt(store, path, lambda data: data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])  # same size, one bit
    with pytest.raises(IntegrityError, match=r"file 'latents' of latents/\w+ .* is corrupt \(sha256"):
        store.read_table(manifest, "latents")
    with pytest.raises(IntegrityError, match="'latents'"):
        store.verify(manifest)

    corrupt(store, path, lambda data: data[:100])
    with pytest.raises(IntegrityError, match=r"corrupt \(size 100 !="):
        store.read_table(manifest, "latents")

    store.fs.rm(path)
    with pytest.raises(IntegrityError, match="'latents' .* is missing"):
        store.read_table(manifest, "latents")


def test_an_edited_manifest_is_detected(store):
    manifest = commit_simple(store)
    path = f"{store.stage_dir(manifest.stage, manifest.key)}/manifest.json"
    corrupt(store, path, lambda data: data.replace(b'"rows": 6', b'"rows": 7'))
    with pytest.raises(IntegrityError, match="modified after commit"):
        store.get(manifest.stage, manifest.key)
    corrupt(store, path, lambda data: data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="not a valid manifest"):
        store.get_ref(manifest.ref)


def test_exclusive_create_has_one_winner(store):
    path = store.backend.join("probe", "once.json")
    assert store.backend.create_exclusive(path, b"first") is True
    assert store.backend.create_exclusive(path, b"second") is False
    assert store.backend.read_bytes(path) == b"first"


# ---------------------------------------------------------------------------------------
# Two processes, one key


def test_two_processes_committing_one_key_agree_on_one_winner(store_uri):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=race_worker, args=(store_uri, i, barrier, results)) for i in range(2)]
    for worker in workers:
        worker.start()
    seen = [results.get(timeout=120) for _ in range(2 * ROUNDS)]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    store = Store.open(store_uri)
    for round_ in range(ROUNDS):
        reports = [r for r in seen if r[0] == round_]
        assert len(reports) == 2
        digests, winners = {r[2] for r in reports}, {r[3] for r in reports}
        assert len(digests) == 1 and len(winners) == 1  # both writers returned the same manifest
        committed = store.get("race", f"race{round_}")  # parses and passes its digest check: not torn
        assert committed.digest in digests
        values = table_column_to_numpy(store.read_table(committed, "values"), "v")
        assert set(values.tolist()) == winners  # the data is the winner's, never a mix
    # The losers' attempts are invisible leftovers for gc.
    assert len([i for i in plan_gc(store, now=clock() + timedelta(hours=2)).items if i.kind == STAGING]) == ROUNDS
