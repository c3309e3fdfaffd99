"""Run by test_multinode.py in a fresh process: a two-node Ray test cluster on this machine.

Prints one JSON line: the Ray nodes the latents stage's encoder actors ran on, and the
nodes of a two-worker training run (one worker per node by construction).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
# The encoder pool starts work once both its actors are up. Ray Data's default starts with the first
# actor ready, and on 96 tiny images that one can encode every block before the other has started
# (CI saw it: every row from one node). What this job shows is where actors can run, not that race.
os.environ["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"] = "300"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from infra.cards import GeneratorCard, LatentsCard, VAECard  # noqa: E402
from infra.config import GeneratorConfig, IngestConfig, LatentsConfig, Resources  # noqa: E402
from infra.store import Store  # noqa: E402
from models.registry import model_spec  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402
from workers.stages.s01_ingest import run_ingest  # noqa: E402
from workers.stages.s03_latents import run_latents  # noqa: E402
from workers.stages.s04_base import run_base  # noqa: E402


def main(folder: str) -> None:
    # Two nodes of 3 logical CPUs: a 2-CPU training worker fits once per node and leaves
    # each node a CPU for the Ray Data tasks that feed it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        store = Store.open(os.path.join(folder, "store"))
        images = run_ingest(store, IngestConfig(limit=96, image_size=16))
        vae = VAE(VAEConfig(in_channels=1, latent_channels=2, base_channels=8, downsample=4))
        with store.begin("vae", "untrained", config={"untrained": True}, inputs=[images]) as writer:
            writer.write_model("vae", vae, model_spec(vae))
            card = VAECard(
                latent_scale=1.0,
                latent_shape=(2, 4, 4),
                in_channels=1,
                image_size=16,
                latent_channels=2,
                downsample=4,
                recon_mse_train=0.0,
                measured_on=0,
            )
            vae_manifest = writer.commit(metrics=card.to_metrics())
        # Two 2-CPU actors cannot share a 3-CPU node: they spread over both nodes.
        latents = run_latents(
            store, LatentsConfig(batch_size=8, resources=Resources(workers=2, cpus=2)), images, vae_manifest
        )
        base = run_base(
            store,
            GeneratorConfig(
                steps=6, batch_size=16, checkpoint_every=3, warmup_steps=0, resources=Resources(workers=2, cpus=2)
            ),
            latents,
        )
        checkpoint = store.checkpoints("base", base.key).latest()
        print(
            json.dumps(
                {
                    "nodes": [node["NodeID"] for node in ray.nodes() if node["Alive"]],
                    "encoder_nodes": list(LatentsCard.from_manifest(latents).encoder_nodes),
                    "train_nodes": checkpoint.state["nodes"] if checkpoint else None,
                    "steps": GeneratorCard.from_manifest(base).steps,
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
