"""The shape every stage shares: key the inputs, return a committed result, or build and commit.

A stage is a function ``(store, config section, input manifests) -> Manifest``. This module
holds the one piece of it that is not the stage's own work: the content-addressed skip and
the commit around the build. The build writes files through the ``StageWriter`` and returns
the stage's card; it never writes a manifest itself.

    key = hash(stage name, the section's keyed values (Section.keyed) and any extra key values,
               the inputs' digests, the code version of the stage module's import closure)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from infra.cards import Card
from infra.config import Section
from infra.store import Manifest, StageWriter, Store
from infra.version import code_version
from workers import progress
from workers.errors import said_as_store_outage

log = logging.getLogger("fewstep.stage")

Build = Callable[[StageWriter, str], Card]


def run_stage(
    store: Store,
    name: str,
    config: Section | Mapping[str, Any],
    inputs: Sequence[Manifest],
    build: Build,
    *,
    source: str,
    extra_key: Mapping[str, Any] | None = None,
) -> Manifest:
    """Return the committed manifest for (name, config, inputs, code), building it if there is none.

    ``source`` is the stage's module (``__name__``): its import closure versions the key.
    ``extra_key``: values beyond the section that shape the output (a reflow round's index).
    ``build(writer, key)`` writes the stage's files and returns its card; the key is passed so
    long stages can keep checkpoints under it and resume after a crash.
    """
    data = {**(config.keyed() if isinstance(config, Section) else config), **(extra_key or {})}
    version = code_version(source)
    key = store.stage_key(name, data, inputs, version)
    done = store.get(name, key)
    if done is not None:
        log.info("%s: reusing committed %s", name, done.ref)
        progress.stage_reused(name, done)
        return done
    log.info("%s: building %s/%s", name, name, key)
    progress.stage_started(name)
    started = time.perf_counter()
    try:
        with store.begin(name, key, config=data, inputs=inputs, code_version=version) as writer:
            card = build(writer, key)
            metrics = {**card.to_metrics(), "seconds": round(time.perf_counter() - started, 3)}
            manifest = writer.commit(metrics=metrics)
    except Exception as error:
        outage = said_as_store_outage(name, f"{name}/{key}", error)
        if outage is None:
            raise
        raise outage from error
    log.info("%s: committed %s in %.1fs", name, manifest.ref, time.perf_counter() - started)
    progress.stage_finished(name, manifest)
    return manifest
