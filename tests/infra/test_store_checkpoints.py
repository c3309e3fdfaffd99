"""Checkpoints, pointers and run records, on a local folder and on S3."""

from __future__ import annotations

import pytest
import torch

from infra.errors import IntegrityError, NotCommitted


def snapshot(step: int) -> tuple[dict[str, torch.Tensor], dict]:
    generator = torch.Generator().manual_seed(step)
    tensors = {
        "model.weight": torch.randn(3, 2, generator=generator),
        "ema.weight": torch.randn(3, 2, generator=generator),
        "rng.cpu": torch.get_rng_state(),  # uint8, as the training loop stores RNG state
    }
    return tensors, {"curve": [1.0 / (step + 1)], "epoch": step // 2}


def test_save_latest_and_prune(store):
    checkpoints = store.checkpoints("base", "k1")
    assert checkpoints.latest() is None and checkpoints.steps() == []
    for step in (5, 10, 15):
        checkpoints.save(step, *snapshot(step))
    latest = checkpoints.latest()
    tensors, state = snapshot(15)
    assert latest.step == 15 and latest.state == state
    assert latest.tensors.keys() == tensors.keys()
    assert all(torch.equal(latest.tensors[k], tensors[k]) for k in tensors)
    assert latest.tensors["rng.cpu"].dtype == torch.uint8

    checkpoints.prune(keep=2)
    assert checkpoints.steps() == [10, 15]
    assert checkpoints.load(10).state == snapshot(10)[1]
    with pytest.raises(NotCommitted, match="step 5 is not committed"):
        checkpoints.load(5)
    with pytest.raises(ValueError, match="keep at least 1"):
        checkpoints.prune(keep=0)


def test_a_crashed_save_is_invisible(store, monkeypatch):
    checkpoints = store.checkpoints("base", "k2")
    checkpoints.save(1, *snapshot(1))

    def power_cut(path, data):
        raise RuntimeError("power cut")

    monkeypatch.setattr(store.backend, "create_exclusive", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        checkpoints.save(2, *snapshot(2))
    monkeypatch.undo()
    assert checkpoints.steps() == [1] and checkpoints.latest().step == 1
    checkpoints.save(2, *snapshot(2))  # the retry commits
    assert checkpoints.latest().step == 2
    checkpoints.prune(keep=1)
    assert checkpoints.steps() == [2]


def test_saving_a_committed_step_again_keeps_the_first(store):
    checkpoints = store.checkpoints("base", "k3")
    checkpoints.save(4, *snapshot(4))
    checkpoints.save(4, *snapshot(99))
    assert checkpoints.latest().state == snapshot(4)[1]


def test_a_corrupt_checkpoint_fails_with_the_file_named(store):
    checkpoints = store.checkpoints("base", "k4")
    checkpoints.save(7, *snapshot(7))
    record = checkpoints.record(7)
    path = f"{checkpoints.step_dir(7)}/{record.files['tensors.safetensors'].path}"
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=r"'tensors.safetensors' of checkpoint base/k4 step 7 .* corrupt"):
        checkpoints.latest()


def test_pointers_are_replaced_and_must_name_committed_refs(store):
    refs = []
    for seed in (1, 2):
        with store.begin("consistency", f"key{seed}", config={"seed": seed}) as writer:
            writer.write_json("info", {"seed": seed})
            refs.append(writer.commit().ref)
    assert store.get_pointer("serving/current") is None
    store.put_pointer("serving/current", refs[0])
    assert store.get_pointer("serving/current") == refs[0]
    store.put_pointer("serving/current", refs[1])
    assert store.get_pointer("serving/current") == refs[1]
    assert store.list_pointers() == {"serving/current": refs[1]}
    with pytest.raises(NotCommitted, match="consistency/nope"):
        store.put_pointer("serving/current", "consistency/nope")
    assert store.get_pointer("serving/current") == refs[1]


def test_run_records_list_the_refs_of_a_run(store):
    with store.begin("ingest", "k", config={}) as writer:
        writer.write_json("info", {})
        ref = writer.commit().ref
    store.record_run("run-1", {"ingest": ref}, {"preset": "quick"})
    runs = store.list_runs()
    assert [run["run_id"] for run in runs] == ["run-1"]
    assert runs[0]["refs"] == {"ingest": ref} and runs[0]["info"] == {"preset": "quick"}
    with pytest.raises(NotCommitted):
        store.record_run("run-2", {"vae": "vae/missing"})
