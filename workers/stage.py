"""The shape every stage shares: key the inputs, return a committed result, or build and commit.

A stage is a function ``(store, config section, input manifests) -> Manifest``. This module
holds the one piece of it that is not the stage's own work: the content-addressed skip and the
commit around the build. The build writes files through the ``StageWriter`` and returns its
headline metrics; it never writes a manifest itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

from infra.config import Section, section_dict
from infra.store import Manifest, StageWriter, Store

log = logging.getLogger("fewstep.stage")

Build = Callable[[StageWriter, str], Mapping[str, Any]]

# Where a Ray Data stage runs, not what it computes: left out of stage keys, so moving a
# stage to more actors or onto GPUs does not recompute it and everything below it.
RESOURCE_FIELDS = ("num_actors", "cpus_per_actor", "gpus_per_actor")


def keyed_section(config: Section | Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config section that decides a stage's output (its key's config)."""
    data = section_dict(config) if isinstance(config, Section) else dict(config)
    return {name: value for name, value in data.items() if name not in RESOURCE_FIELDS}


def run_stage(
    store: Store,
    name: str,
    config: Section | Mapping[str, Any],
    inputs: Sequence[Manifest],
    build: Build,
) -> Manifest:
    """Return the committed manifest for (name, config, inputs), building it if there is none.

    ``build(writer, key)`` writes the stage's files and returns its metrics; the key is passed
    so long stages can keep checkpoints under it and resume after a crash.
    """
    data = keyed_section(config)
    key = store.stage_key(name, data, inputs)
    done = store.get(name, key)
    if done is not None:
        log.info("%s: reusing committed %s", name, done.ref)
        return done
    log.info("%s: building %s/%s", name, name, key)
    started = time.perf_counter()
    with store.begin(name, key, config=data, inputs=inputs) as writer:
        metrics = dict(build(writer, key))
        metrics.setdefault("seconds", round(time.perf_counter() - started, 3))
        manifest = writer.commit(metrics=metrics)
    log.info("%s: committed %s in %.1fs", name, manifest.ref, time.perf_counter() - started)
    return manifest
