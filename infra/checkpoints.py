"""Checkpoints of a running stage: one committed, verified snapshot per step.

    checkpoints/{stage}/{key}/step-{n:08d}/manifest.json
    checkpoints/{stage}/{key}/step-{n:08d}/attempts/{attempt}/tensors.safetensors, state.json

The same commit protocol as stage outputs: files under a fresh attempt folder, verified and
made durable, then the step's manifest created exclusively. A crash mid-save leaves a step without a
manifest, which :meth:`CheckpointStore.latest` never returns. Tensors carry everything
array-like (model, EMA, optimizer moments, RNG states as uint8); ``state`` is plain JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from infra.backends import Backend
from infra.errors import IntegrityError, NotCommitted
from infra.manifest import (
    MANIFEST,
    FileEntry,
    canonical_json,
    check_file,
    describe_invalid,
    new_attempt_id,
    read_checked,
    sha256_hex,
    to_jsonable,
    utc_now,
)

if TYPE_CHECKING:
    from torch import Tensor

STEP_DIR = re.compile(r"^step-(\d{8,})$")
TENSORS, STATE = "tensors.safetensors", "state.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]


class CheckpointManifest(BaseModel):
    """The commit record of one step: its files, code version and time; ``digest`` covers the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int
    files: dict[str, FileEntry]
    code_version: str
    created_at: str
    digest: str

    def content_digest(self) -> str:
        return sha256_hex(canonical_json(self.model_dump(exclude={"digest"})))


class CheckpointStore:
    """The checkpoints of one stage run (``stage/key``). Only one process should save at a time
    (rank 0); saving a step that is already committed keeps the committed one."""

    def __init__(self, backend: Backend, stage: str, key: str, code_version: str):
        self.backend = backend
        self.stage, self.key = stage, key
        self.code_version = code_version
        self.root = backend.join("checkpoints", stage, key)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.backend.uri!r}, {self.stage}/{self.key})"

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step-{int(step):08d}"

    def save(self, step: int, tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
        """Commit ``tensors`` and JSON-able ``state`` as step ``step``."""
        from infra.weights import tensors_to_bytes

        if int(step) < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        attempt = new_attempt_id()
        base = f"{self.step_dir(step)}/attempts/{attempt}"
        payload = {
            TENSORS: tensors_to_bytes(tensors, {"fewstep.step": str(int(step))}),
            STATE: json.dumps(to_jsonable(dict(state), "checkpoint state"), sort_keys=True).encode(),
        }
        files = {}
        for name, data in payload.items():
            self.backend.write_bytes(f"{base}/{name}", data)
            size, digest = self.backend.hash_file(f"{base}/{name}")
            expected = FileEntry(path=f"attempts/{attempt}/{name}", size=len(data), sha256=sha256_hex(data))
            check_file(self.label(step), name, f"{base}/{name}", expected, size, digest)
            files[name] = expected
        self.backend.make_durable(f"{base}/{name}" for name in payload)  # data on disk before its manifest
        body = {
            "step": int(step),
            "files": {k: v.model_dump() for k, v in files.items()},
            "code_version": self.code_version,
            "created_at": utc_now(),
        }
        record = CheckpointManifest(**body, digest=sha256_hex(canonical_json(body)))
        if not self.backend.create_exclusive(
            f"{self.step_dir(step)}/{MANIFEST}", record.model_dump_json(indent=2).encode()
        ):
            self.backend.remove(base)  # this step was committed before (e.g. by a run that crashed after saving)

    def label(self, step: int) -> str:
        return f"checkpoint {self.stage}/{self.key} step {step}"

    def steps(self) -> list[int]:
        """Committed steps, ascending (one listing)."""
        found = set()
        for rel in self.backend.list_files(self.root):
            parts = rel.split("/")
            match = STEP_DIR.match(parts[0])
            if match and len(parts) == 2 and parts[1] == MANIFEST:
                found.add(int(match.group(1)))
        return sorted(found)

    def record(self, step: int) -> CheckpointManifest:
        path = f"{self.step_dir(step)}/{MANIFEST}"
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            raise NotCommitted(f"{self.label(step)} is not committed; committed steps: {self.steps()}") from None
        try:
            record = CheckpointManifest.model_validate_json(data)
        except ValidationError as error:
            raise IntegrityError(
                f"{path} is not a valid checkpoint manifest ({describe_invalid(error)}); "
                f"delete {self.step_dir(step)} to resume from an earlier step"
            ) from None
        if record.content_digest() != record.digest or record.step != step:
            raise IntegrityError(
                f"{path} was modified after commit; delete {self.step_dir(step)} to resume from an earlier step"
            )
        return record

    def load(self, step: int) -> Checkpoint:
        """Step ``step``, every file checked against its manifest."""
        from infra.weights import tensors_from_bytes

        record = self.record(step)
        blobs = {}
        for name, entry in record.files.items():
            path = f"{self.step_dir(step)}/{entry.path}"
            remedy = f"delete {self.step_dir(step)} to resume from an earlier step"
            blobs[name] = read_checked(self.backend, self.label(step), name, path, entry, remedy)
        return Checkpoint(
            step=record.step,
            tensors=tensors_from_bytes(blobs[TENSORS], f"{self.label(step)} tensors"),
            state=json.loads(blobs[STATE]),
        )

    def latest(self) -> Checkpoint | None:
        """The newest committed step, verified; None when nothing was committed."""
        steps = self.steps()
        return self.load(steps[-1]) if steps else None

    def prune(self, keep: int = 2) -> None:
        """Delete all but the ``keep`` newest committed steps (manifest first, so a step is never half-visible),
        and the uncommitted leftovers of steps older than the newest committed one."""
        if keep < 1:
            raise ValueError(f"prune(keep={keep}) would delete every checkpoint; keep at least 1")
        committed = self.steps()
        doomed = committed[:-keep]
        for step in doomed:
            self.backend.remove(f"{self.step_dir(step)}/{MANIFEST}")
            self.backend.remove(self.step_dir(step))
        if committed:
            newest = committed[-1]
            for name in self.backend.list_dirs(self.root):
                match = STEP_DIR.match(name)
                if match and int(match.group(1)) < newest and int(match.group(1)) not in committed:
                    self.backend.remove(f"{self.root}/{name}")
