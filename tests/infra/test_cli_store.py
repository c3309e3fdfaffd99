"""``fewstep status`` and ``fewstep gc`` as a user runs them, on a local folder and on S3."""

from __future__ import annotations

import io
import json
import socket
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta

import pytest

import infra.gc
from infra.store import Store


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="module")
def app():
    """The ``fewstep`` console script's entry point, run in this process."""
    from flows.cli import main

    return main


def invoke(app, *args: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            app(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
    return Result(code, out.getvalue(), err.getvalue())


def commit(store: Store, stage: str, inputs=(), **metrics):
    key = store.stage_key(stage, {"stage": stage}, inputs)
    with store.begin(stage, key, config={"stage": stage}, inputs=inputs) as writer:
        writer.write_json("info", {"stage": stage})
        return writer.commit(metrics)


def crashed_attempt(store: Store, stage: str = "base") -> str:
    """A writer that died before commit; returns its attempt folder."""
    try:
        with store.begin(stage, "crashed0000000", config={}) as writer:
            writer.write_bytes("half.bin", b"x" * 100)
            raise RuntimeError("killed")
    except RuntimeError:
        return writer.prefix


def test_status_shows_stages_keys_lineage_metrics_and_pointers(app, store):
    ingest = commit(store, "ingest", images=1797)
    vae = commit(store, "vae", [ingest], loss=0.012345, latent_scale=0.81)
    store.put_pointer("serving/current", vae.ref)
    result = invoke(app, "status", "--store", store.uri)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"store {store.uri}")
    vae_line = next(line for line in lines if line.startswith("vae "))
    assert vae.key in vae_line and ingest.ref in vae_line  # lineage: the input ref
    assert "latent_scale=0.81" in vae_line and "loss=0.01235" in vae_line
    assert any(line.startswith("ingest ") and "images=1797" in line for line in lines)
    assert f"serving/current -> {vae.ref}" in result.stdout

    as_json = json.loads(invoke(app, "status", "--store", store.uri, "--json").stdout)
    assert [s["ref"] for s in as_json["stages"]] == [ingest.ref, vae.ref]
    assert as_json["stages"][1]["inputs"] == [ingest.ref]
    assert as_json["pointers"] == {"serving/current": vae.ref}


def test_status_of_an_empty_store(app, tmp_path):
    result = invoke(app, "status", "--store", str(tmp_path / "empty"))
    assert result.exit_code == 0 and "no committed stages" in result.stdout


def travel(monkeypatch, hours: float) -> None:
    """Move gc's clock forward, so what was just written looks ``hours`` old."""
    later = infra.gc.clock() + timedelta(hours=hours)
    monkeypatch.setattr(infra.gc, "clock", lambda: later)


def test_gc_lists_then_removes_leftovers_and_unreferenced_outputs(app, store, monkeypatch):
    ingest = commit(store, "ingest")
    kept = commit(store, "vae", [ingest])
    orphan = commit(store, "vae-old")
    store.put_pointer("serving/current", kept.ref)
    leftover = crashed_attempt(store)
    checkpoints = store.checkpoints(kept.stage, kept.key)  # of a finished stage
    checkpoints.save(1, {}, {"step": 1})

    # Young leftovers and young unreferenced outputs are left alone by default: the stage,
    # or the run that will reference them, may still be going.
    listed = invoke(app, "gc", "--store", store.uri)
    assert listed.exit_code == 0, listed.output
    assert "attempts" not in listed.stdout and f"stages/{orphan.ref}" not in listed.stdout

    travel(monkeypatch, 2)
    listed = invoke(app, "gc", "--store", store.uri)
    rel = leftover.removeprefix(store.root + "/")
    assert rel in listed.stdout and "never committed" in listed.stdout
    assert f"stages/{orphan.ref}" in listed.stdout and "reached by no pointer" in listed.stdout
    assert f"checkpoints/{kept.ref}" in listed.stdout
    assert "would remove 3 items" in listed.stdout and "--yes" in listed.stdout
    assert store.get(orphan.stage, orphan.key) is not None  # listing deletes nothing

    removed = invoke(app, "gc", "--store", store.uri, "--yes")
    assert removed.exit_code == 0 and "removed 3 items" in removed.stdout, removed.output
    assert store.get(orphan.stage, orphan.key) is None
    assert store.get(kept.stage, kept.key) == kept and store.get(ingest.stage, ingest.key) == ingest
    assert store.read_json(kept, "info") == {"stage": "vae"}
    assert store.backend.list_files(leftover) == {} and checkpoints.steps() == []
    again = invoke(app, "gc", "--store", store.uri)
    assert "nothing to collect" in again.stdout


def test_gc_refuses_a_minimum_age_below_the_floor(app, local_store):
    commit(local_store, "ingest")
    for hours in ("0", "0.1"):
        result = invoke(app, "gc", "--store", local_store.uri, "--min-age-hours", hours, "--yes")
        assert result.exit_code == 2 and result.stdout == ""
        assert (
            result.stderr.startswith("fewstep: error: a minimum age of")
            and "below the floor of 0.25 h" in result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1
    assert invoke(app, "gc", "--store", local_store.uri, "--min-age-hours", "0.25").exit_code == 0


def test_gc_without_pointers_or_runs_keeps_every_committed_output(app, local_store, monkeypatch):
    commit(local_store, "ingest")
    travel(monkeypatch, 2)
    result = invoke(app, "gc", "--store", local_store.uri, "--yes")
    assert result.exit_code == 0 and "no pointer, pin or run record" in result.stdout
    assert len(local_store.list_manifests()) == 1


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", ["scheme", "bucket", "credentials", "endpoint"])
def test_bad_input_is_one_line_and_exit_2(app, case, s3_server, s3_uri, monkeypatch):
    args, expected = {
        "scheme": (["--store", "ftp://x"], "has scheme 'ftp'"),
        "bucket": (["--store", "s3://fewstep-no-such-bucket"], "does not exist"),
        "credentials": (["--store", s3_uri], "rejected the credentials"),
        "endpoint": (
            ["--store", s3_uri, "--endpoint-url", f"http://127.0.0.1:{closed_port()}"],
            "no S3 endpoint answered",
        ),
    }[case]
    if case == "credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONG")
    for command in ("status", "gc"):
        result = invoke(app, command, *args)
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr.startswith("fewstep: error: ") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
