"""The pipeline on a real multi-process Ray cluster: ``fewstep run --ray-address`` against a head and
two worker nodes started with ``ray start`` on this host, one of them the "GPU node" (a custom
``trainer`` resource every training section asks for).

Shown from the stage cards: training ran on the trainer node; the latents encoders and the
reflow-pair samplers spread over both worker nodes. Then the trainer node is killed (its whole
process group, SIGKILL) once base training has a checkpoint, and a replacement trainer node
joins, as a KubeRay worker pod would be recreated: Ray Train restarts the worker group there,
the loop resumes from the checkpoint in the store, and the run completes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from local_ray import RayNode, node_env, remove, start_node  # noqa: E402

from infra.cards import GeneratorCard, LatentsCard, PairsCard  # noqa: E402
from infra.errors import NotCommitted  # noqa: E402
from infra.store import SERVING_POINTER, Store  # noqa: E402

# A long drill (~4.5 min on 2 idle cores; three `ray start` nodes): deselected by default, run with -m drill.
pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow, pytest.mark.drill]
BUDGET_S = 1080  # for the whole drill: about 5 min on an idle 2-core machine, far more on a shared one

TRAINER = {"trainer": 1}  # the custom resource standing in for a GPU
PINNED = {"workers": 1, "cpus": 1, "custom": TRAINER}
SPREAD = {"workers": 2, "cpus": 2}  # two 2-CPU actors: no node has room for both
BASE_STEPS = 1500  # long enough that the kill lands mid-training (300 steps took ~25 s here after the Train speed-ups)
# The tiny pipeline of tests/flows/test_pipeline.py, placed on the cluster.
CONFIG = {
    "ingest": {"limit": 240},
    "vae": {"steps": 20, "base_channels": 8, "batch_size": 32, "resources": PINNED},
    "latents": {"batch_size": 32, "resources": SPREAD},
    "base": {"steps": BASE_STEPS, "batch_size": 32, "checkpoint_every": 50, "resources": PINNED},
    "pairs": {"pairs": 64, "steps": 2, "batch_size": 16, "resources": SPREAD},
    "reflow": {"steps": 10, "batch_size": 32, "checkpoint_every": 5, "resources": PINNED},
    "consistency": {"intervals": 4, "steps": 10, "batch_size": 32, "checkpoint_every": 5, "resources": PINNED},
    "features": {"steps": 20, "batch_size": 32, "resources": PINNED},
    "evaluate": {"n": 32, "flow_steps": [1, 2], "flow_solvers": ["euler"], "consistency_steps": [1], "guidance": [1]},
    "probe": {"n": 32, "steps": 2, "student_steps": 1, "fid_resamples": 10},
    # A few training steps learn nothing: the absolute bar is off so a model is promoted and served.
    "serve": {"min_accuracy_over_chance": 0.0, "max_excess_over_ceiling": None},
}
STAGES = {"ingest", "vae", "latents", "base", "pairs", "reflow", "consistency", "features", "evaluate", "probe"}


def node_id(node: RayNode) -> str:
    """The Ray node id of a node, from its raylet's command line."""
    for pid in node.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"/raylet"):
            for arg in cmdline:
                match = re.match(rb"--node_id=([0-9a-f]+)$", arg)
                if match:
                    return match.group(1).decode()
    raise AssertionError(f"no raylet found for ray node {node.name}")


def base_checkpoint(store: Store):
    """The newest base checkpoint in the store (None before the first)."""
    folder = f"{store.root}/checkpoints/base"
    if not store.fs.exists(folder):
        return None
    for key in store.fs.ls(folder):
        try:
            latest = store.checkpoints("base", key.rstrip("/").split("/")[-1]).latest()
        except NotCommitted:  # pruned between listing and reading: look again
            return None
        if latest is not None:
            return latest
    return None


def test_pipeline_on_three_nodes_survives_losing_the_trainer_node(tmp_path):
    deadline = time.monotonic() + BUDGET_S
    nodes: list[RayNode] = []
    run = None
    try:
        head = start_node("head", num_cpus=1)
        nodes.append(head)
        spare = start_node("spare", head_address=head.gcs_address, num_cpus=2, wait=False)
        nodes.append(spare)
        trainer = start_node("trainer", head_address=head.gcs_address, num_cpus=2, resources=TRAINER, wait=False)
        nodes.append(trainer)
        spare.ready(), trainer.ready()
        ids = {node.name: node_id(node) for node in nodes}

        store_uri = str(tmp_path / "store")
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump(CONFIG))
        env = node_env(
            {
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                # Prefect's ephemeral API server: time to start on a busy 2-core machine.
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                # An actor pool starts work once all its actors are up (Ray Data's default starts with the
                # first one ready; on 240 tiny images that one may finish everything before the other starts).
                "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
            }
        )
        env.pop("PREFECT_API_URL", None)
        log = tmp_path / "run.log"
        with open(log, "wb") as sink:
            run = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flows.cli",
                    "run",
                    "--preset",
                    "quick",
                    "--config",
                    str(config),
                    "--store",
                    store_uri,
                    "--ray-address",
                    head.gcs_address,
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        store = Store.open(store_uri)

        # 1. Base training checkpoints on the trainer node: kill that node mid-training.
        while True:
            assert run.poll() is None, f"the run ended before base training checkpointed:\n{log.read_text()[-4000:]}"
            checkpoint = base_checkpoint(store)
            if checkpoint is not None:
                break
            assert time.monotonic() < deadline, f"base training never checkpointed:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        assert checkpoint.state["nodes"] == [ids["trainer"]], (checkpoint.state["nodes"], ids)
        assert checkpoint.step < BASE_STEPS, "base finished before the node could be killed: raise BASE_STEPS"
        trainer.kill()
        trainer.assert_gone()
        killed_at = checkpoint.step

        # 2. A replacement trainer node joins (KubeRay recreates a lost worker pod).
        replacement = start_node("trainer2", head_address=head.gcs_address, num_cpus=2, resources=TRAINER, attempts=2)
        nodes.append(replacement)
        ids["trainer2"] = node_id(replacement)

        run.wait(timeout=max(1.0, deadline - time.monotonic()))
        output = log.read_text()
        assert run.returncode == 0, output[-6000:]

        # 3. What the cards say.
        manifests = {m.stage: m for m in store.list_manifests()}
        assert set(manifests) == STAGES, sorted(manifests)
        base = GeneratorCard.from_manifest(manifests["base"])
        assert base.steps == BASE_STEPS and killed_at <= base.resumed_from < BASE_STEPS, base
        assert list(base.nodes) == [ids["trainer2"]], (base.nodes, ids)  # the restarted worker group's node
        for stage in ("reflow", "consistency"):
            assert list(GeneratorCard.from_manifest(manifests[stage]).nodes) == [ids["trainer2"]], stage
        encoders = set(LatentsCard.from_manifest(manifests["latents"]).encoder_nodes)
        assert encoders == {ids["spare"], ids["trainer"]}, (encoders, ids)  # before the kill: both workers
        samplers = set(PairsCard.from_manifest(manifests["pairs"]).sampler_nodes)
        # After the kill the pairs come from the live nodes only. Which of them draws is Ray Data's
        # choice: with 64 pairs the first sampler actor up may take every block before the second
        # starts (seen on merged main), so spreading is shown by the encoders above, not here.
        assert samplers and samplers <= {ids["spare"], ids["trainer2"]}, (samplers, ids)
        assert store.get_pointer(SERVING_POINTER) is not None
        print(
            f"killed the trainer node at base step {killed_at}; base resumed from {base.resumed_from} on the "
            f"replacement node and finished {base.steps} steps"
        )
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(timeout=30)
        for node in reversed(nodes):
            remove(node)
