"""The body of one racing writer for test_store_commit (its own light module: spawned children import it)."""

from __future__ import annotations

import numpy as np

from infra.store import Store
from infra.tables import tensors_to_table

ROUNDS = 3


def race_worker(uri: str, writer_id: int, barrier, results) -> None:
    """Commit ROUNDS keys; before each commit wait for the other writer, so both publish at once."""
    store = Store.open(uri)
    for round_ in range(ROUNDS):
        with store.begin("race", f"race{round_}", config={"round": round_}) as writer:
            writer.write_table("values", tensors_to_table({"v": np.full(500, writer_id)}))
            barrier.wait(timeout=60)
            manifest = writer.commit({"writer": writer_id})
        results.put((round_, writer_id, manifest.digest, manifest.metrics["writer"]))
