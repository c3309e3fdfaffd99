"""The pipeline flow end to end on the session's real ``prefect server``: called in this process, and
as a user runs it (the CLI) with an S3 store, killed mid-training and re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from drills.kit import TINY
from infra.cards import GeneratorCard, PairsCard, ProbeCard
from infra.champions import read_history
from infra.config import load_config
from infra.store import Store
from workers.evaluation.table import read_rows

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

STAGES = {"ingest", "vae", "latents", "base", "pairs", "reflow", "consistency", "features", "evaluate", "probe"}
# The harness run also trains the optional DDPM baseline (a few steps) and evaluates it at 2 steps,
# the optional flow-map student, evaluated at 1 and 2 steps, the guidance-distilled base and the LoRA
# adapter.
WITH_DDPM = {
    **TINY,
    "ddpm": {"enabled": True, "steps": 10, "batch_size": 32, "checkpoint_every": 5},
    "flowmap": {**TINY["flowmap"], "enabled": True},
    "guidance_distill": {**TINY["guidance_distill"], "enabled": True},
    "lora": {**TINY["lora"], "enabled": True},
    "evaluate": {**TINY["evaluate"], "diffusion_steps": [2], "flowmap_steps": [1, 2]},
}


def committed(store: Store) -> dict[str, str]:
    """ref -> created_at of every committed manifest."""
    return {m.ref: m.created_at for m in store.list_manifests()}


def test_pipeline_under_the_harness_then_rerun_commits_nothing(prefect_harness, ray_local, tmp_path):
    from flows.pipeline import pipeline

    store_uri = str(tmp_path / "store")
    config = load_config("quick", overrides=WITH_DDPM).model_dump(mode="json")

    first = pipeline(config=config, store_uri=store_uri)
    store = Store.open(store_uri)
    assert {m.stage for m in store.list_manifests()} == STAGES | {"ddpm", "flowmap", "guidance_distill", "lora"}
    assert first["promotion"]["promoted"], first["promotion"]
    # The DDPM baseline is evaluated beside the others at its step counts, and never the promotion candidate.
    ddpm = first["refs"]["ddpm"]
    assert GeneratorCard.from_manifest(store.get_ref(ddpm)).family == "diffusion"
    assert store.get_ref(ddpm).inputs == [first["refs"]["latents"]]
    rows = read_rows(store, store.get_ref(first["refs"]["evaluate"]))
    assert {(r.sampler, r.steps, r.guidance, r.nfe) for r in rows if r.stage_key == ddpm} == {
        ("ddpm", 2, 1.0, 2),
        ("ddim", 2, 1.0, 2),
        ("ddpm", 2, 2.0, 4),  # guided: both network passes count
        ("ddim", 2, 2.0, 4),
    }
    # Pairs and the student at the base model's best guidance, as the probe after base measured it.
    best = ProbeCard.from_manifest(store.get_ref(first["refs"]["probe_base"])).best_guidance
    assert best in (1.0, 2.0, 4.0)
    assert PairsCard.from_manifest(store.get_ref(first["refs"]["pairs_1"])).guidance == best
    assert GeneratorCard.from_manifest(store.get_ref(first["refs"]["consistency"])).guidance == best
    # The students take no guidance: one row per step count, at their card's scale.
    student = [r for r in rows if r.stage_key == first["refs"]["consistency"]]
    assert [(r.steps, r.guidance) for r in student] == [(1, best)]
    flowmap = first["refs"]["flowmap"]
    card = GeneratorCard.from_manifest(store.get_ref(flowmap))
    assert (card.family, card.guidance, card.teacher_ref) == ("flowmap", best, first["refs"]["reflow_1"])
    flowmap_rows = [r for r in rows if r.stage_key == flowmap]
    assert [(r.sampler, r.steps, r.nfe, r.guidance) for r in flowmap_rows] == [
        ("flowmap", 1, 1, best),
        ("flowmap", 2, 2, best),
    ]
    # The guidance-distilled base: a flow model at every scale, a guided step one network pass.
    guided = first["refs"]["guidance_distill"]
    assert {(r.steps, r.guidance, r.nfe) for r in rows if r.stage_key == guided} == {
        (1, 1.0, 1),
        (1, 2.0, 1),
        (2, 1.0, 2),
        (2, 2.0, 2),
    }
    # The LoRA student: an adapter on the base, sampled as a consistency student at its scale.
    lora = first["refs"]["lora"]
    lora_card = GeneratorCard.from_manifest(store.get_ref(lora))
    assert (lora_card.family, lora_card.adapter_of, lora_card.guidance) == ("consistency", first["refs"]["base"], best)
    assert [(r.sampler, r.steps, r.nfe) for r in rows if r.stage_key == lora] == [("consistency", 1, 1)]
    # The candidate is the student with the lowest FID at the served step count, with the sampler it is served by.
    candidate = first["promotion"]["candidate"]
    students = (first["refs"]["consistency"], flowmap, lora, guided)
    at_one = {}
    for r in rows:
        if r.steps == 1 and r.stage_key in students and r.sampler in ("consistency", "flowmap", "euler"):
            at_one[r.stage_key] = min(at_one.get(r.stage_key, float("inf")), r.fid)
    assert candidate == min(at_one, key=at_one.get), at_one
    # Serving's default scale is recorded with the pointer.
    assert store.pointer_record("serving/current")["guidance"] == first["promotion"]["guidance"] == best
    assert store.get_pointer("serving/current") == candidate
    assert [run["refs"] for run in store.list_runs()] == [first["refs"]]
    # The decision goes to the run record, and the promotion to the champion history.
    assert store.list_runs()[0]["info"]["promotion"]["candidate"] == candidate
    history = read_history(store, "serving/current")
    assert [(e["ref"], e["run_id"]) for e in history] == [(candidate, first["run_id"])]

    before = committed(store)
    started = time.perf_counter()
    second = pipeline(config=config, store_uri=store_uri)
    rerun_seconds = time.perf_counter() - started
    print(f"re-run of a finished pipeline: {rerun_seconds:.1f}s")
    assert second["refs"] == first["refs"]
    assert committed(store) == before, "the re-run recomputed a stage"

    # One changed field re-runs only what is downstream of it (the other students off: one candidate).
    changed = load_config(
        "quick",
        overrides={
            **WITH_DDPM,
            "flowmap": TINY["flowmap"],
            "guidance_distill": TINY["guidance_distill"],
            "lora": TINY["lora"],
            "consistency": {**TINY["consistency"], "intervals": 3},
        },
    )
    third = pipeline(config=changed.model_dump(mode="json"), store_uri=store_uri)
    # Champion against challenger: the served student is scored beside the new one, in one evaluation.
    assert candidate in store.get_ref(third["refs"]["evaluate"]).inputs
    challenge = third["promotion"]
    assert challenge["current"] == candidate and challenge["candidate"] == third["refs"]["consistency"]
    if not challenge["below_bar"]:
        assert challenge["difference"] is not None, challenge  # the paired interval decided
        assert challenge["candidate_evaluation"] == challenge["current_evaluation"] == third["refs"]["evaluate"]
    same = {name for name in first["refs"] if third["refs"].get(name) == first["refs"][name]}
    assert same == {"images", "vae", "latents", "base", "ddpm", "pairs_1", "reflow_1", "features"} | {
        "probe_base",
        "probe_reflow_1",
        "probe_ddpm",
    }
    # A probe after each generator stage, keyed by its model.
    probes = {name: first["refs"][f"probe_{name}"] for name in ("base", "reflow_1", "consistency", "flowmap", "ddpm")}
    assert {name: store.get_ref(ref).inputs[0] for name, ref in probes.items()} == {
        name: first["refs"][name] for name in probes
    }


# ---------------------------------------------------------------------------------------
# The session's real Prefect server, an S3 store, a SIGKILL during base training


def cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_real_server_s3_sigkill_during_base_then_resume(prefect_server, ray_local, s3_uri, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "base": {**TINY["base"], "steps": 120}}))
    env = dict(os.environ, PREFECT_API_URL=prefect_server.url, PYTHONUNBUFFERED="1")
    args = ["run", "--preset", "quick", "--config", str(config_file), "--store", s3_uri]
    store = Store.open(s3_uri)

    # 1. Run, and SIGKILL the whole flow process once base training has a checkpoint.
    process = cli(args, env)
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            pytest.fail(f"the run ended before base training checkpointed:\n{process.stdout.read()[-4000:]}")
        base_keys = (
            store.fs.ls(f"{store.root}/checkpoints/base") if store.fs.exists(f"{store.root}/checkpoints/base") else []
        )
        if base_keys and any(store.checkpoints("base", key.rstrip("/").split("/")[-1]).steps() for key in base_keys):
            break
        assert time.monotonic() < deadline, "base training never checkpointed"
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()

    before = committed(store)
    # features runs before base (the probe after base reads it): committed, like the stages before it
    assert {ref.split("/")[0] for ref in before} == {"ingest", "vae", "latents", "features"}, (
        "a partial stage became visible"
    )

    # 2. Re-run: finished stages come back from the store, base resumes from its checkpoint.
    rerun = cli(args, env)
    output, _ = rerun.communicate(timeout=800)
    assert rerun.returncode == 0, output[-4000:]
    after = committed(store)
    assert all(after[ref] == created for ref, created in before.items()), "a finished stage was recomputed"
    base = [store.get_ref(ref) for ref in after if ref.startswith("base/")]
    card = GeneratorCard.from_manifest(base[0]) if len(base) == 1 else None
    assert card is not None and card.resumed_from >= 10 and card.steps == 120
    assert {ref.split("/")[0] for ref in after} == STAGES

    # 3. What the Prefect UI shows: this store's two flow runs, their task runs by stage name, their artifacts
    # (the server is the session's: other tests' runs are on it too).
    flow_runs = [
        run
        for run in prefect_server.api("/flow_runs/filter", {"flows": {"name": {"any_": ["pipeline"]}}})
        if run["parameters"].get("store_uri") == store.uri
    ]
    states = sorted(run["state_type"] for run in flow_runs)
    assert "COMPLETED" in states and len(flow_runs) == 2, states
    ours = {"flow_runs": {"id": {"any_": [run["id"] for run in flow_runs]}}}
    task_names = {run["name"] for run in prefect_server.api("/task_runs/filter", ours)}
    assert {
        "ingest",
        "vae",
        "latents",
        "base",
        "pairs-1",
        "reflow-1",
        "consistency",
        "features",
        "evaluate",
        "promote",
        "probe-base",
        "probe-consistency",
    } <= task_names, task_names
    artifacts = prefect_server.api("/artifacts/filter", {"artifacts": {"flow_run_id": ours["flow_runs"]["id"]}})
    artifact_keys = {a["key"] for a in artifacts if a.get("key")}
    assert {
        "fewstep-run-summary",
        "fewstep-run-report",
        "fewstep-fid-vs-steps",
        "fewstep-evaluation-report",
        "fewstep-base-metrics",
    } <= artifact_keys, artifact_keys

    # 4. A scheduled deployment with the given cron.
    scheduled = cli(
        [
            "schedule",
            "--cron",
            "0 3 * * 0",
            "--register-only",
            "--preset",
            "quick",
            "--config",
            str(config_file),
            "--store",
            s3_uri,
        ],
        env,
    )
    output, _ = scheduled.communicate(timeout=120)
    assert scheduled.returncode == 0, output
    deployments = [
        d for d in prefect_server.api("/deployments/filter", {}) if d["parameters"].get("store_uri") == s3_uri
    ]
    crons = [s["schedule"].get("cron") for d in deployments for s in d.get("schedules", [])]
    assert crons == ["0 3 * * 0"], deployments

    bad = cli(["schedule", "--cron", "every sunday", "--register-only", "--store", s3_uri], env)
    output, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "invalid cron expression" in output and "Traceback" not in output, output


def test_an_unlabelled_rgb_folder_runs_end_to_end(prefect_harness, ray_local, tmp_path):
    """A flat folder of RGB images (no labels): unconditional models, a self-supervised feature
    space, a promoted student that draws images for requests without labels."""
    from flows.pipeline import pipeline
    from infra.cards import FeaturesCard, GeneratorCard, ImagesCard
    from workers.generator import Generator, Request
    from workers.pixels import encode_png
    from workers.sources.shapes import render_shapes

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, pixels in enumerate(render_shapes(0, 240, seed=5).pixels):
        (folder / f"photo{i:03d}.png").write_bytes(encode_png(pixels))
    overrides = {**TINY, "ingest": {"source": str(folder), "channels": 3, "image_size": 16}, "ddpm": {"enabled": False}}
    summary = pipeline(
        config=load_config("quick", overrides=overrides).model_dump(mode="json"), store_uri=str(tmp_path / "store")
    )
    store = Store.open(str(tmp_path / "store"))
    refs = summary["refs"]
    assert ImagesCard.from_manifest(store.get_ref(refs["images"])).num_classes == 0
    assert FeaturesCard.from_manifest(store.get_ref(refs["features"])).kind == "encoder"
    assert summary["promotion"]["promoted"] and summary["served"] == refs["consistency"]
    student = GeneratorCard.from_manifest(store.get_ref(refs["consistency"]))
    assert student.num_classes == 0 and student.guidance == 1.0  # nothing to guide without labels
    rows = read_rows(store, store.get_ref(refs["evaluate"]))
    assert {r.guidance for r in rows if r.stage_key == refs["base"]} == {1.0}  # one scale, not [1, 2]
    generator = Generator.load(store, store.get_ref(summary["served"]), device="cpu")
    images = generator.generate(Request(n=3, steps=1, sampler=next(iter(generator.samplers)), seed=4))
    assert images.pixels.shape == (3, 16, 16, 3) and images.labels.tolist() == [0, 0, 0]
