"""The manifest: the one record that makes a stage's output exist.

A manifest lists every file of a committed stage output with its size and sha256, the
config and input refs that produced it, its metrics, the code version and the time. Its
own ``digest`` is the sha256 of its canonical JSON (everything but the digest), so a
downstream stage key can name exactly this output, and a tampered manifest is detected.

    stage_key = sha256(canonical_json({stage, config, input digests, code version}))[:16]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import uuid
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from infra.errors import IntegrityError, InvalidName

MANIFEST = "manifest.json"  # the file name of every commit record
MANIFEST_FORMAT = "fewstep.manifest/1"
ATTEMPT_TIME = "%Y%m%dT%H%M%SZ"
KEY_HEX_CHARS = 16  # 64 bits: collisions need ~4e9 keys of one stage

SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}$")


# ---------------------------------------------------------------------------------------
# Canonical JSON: one byte string per value, so equal configs hash equal


def to_jsonable(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON types: dicts with str keys, lists, str, int, finite float, bool, None.

    Accepts pydantic models, dataclasses, tuples, paths and numpy scalars/arrays; refuses
    anything else (and NaN/inf) with the path to the offending entry.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; JSON in the store needs finite numbers")
        return value
    if isinstance(value, BaseModel):
        return to_jsonable(value.model_dump(mode="json"), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has key {k!r} of type {type(k).__name__}; keys must be strings")
            out[k] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist") and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return to_jsonable(value.tolist(), where)
    raise ValueError(f"{where} is a {type(value).__name__} ({value!r:.80}); store only JSON-able values")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes that get hashed."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_attempt_id() -> str:
    """``20261126T145300Z-1a2b3c4d5e6f``: unique per writer, and its age is readable by ``fewstep gc``."""
    return f"{datetime.now(timezone.utc).strftime(ATTEMPT_TIME)}-{uuid.uuid4().hex[:12]}"


def attempt_time(attempt: str) -> datetime | None:
    """When an attempt folder was started, from its name (None for names not made here)."""
    try:
        return datetime.strptime(attempt.split("-", 1)[0], ATTEMPT_TIME).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# Names


def check_segment(value: str, what: str) -> str:
    """A stage name, key or checkpoint id: one path segment of letters, digits and ``_.=+-``."""
    if not isinstance(value, str) or not SEGMENT.match(value) or value in (".", ".."):
        raise InvalidName(
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits or _.=+- , starting with a letter or digit"
        )
    return value


def check_relative_path(value: str, what: str) -> str:
    """A file name inside a stage output: ``a/b.parquet`` (no ``..``, no leading ``/``, no empty parts)."""
    parts = value.split("/") if isinstance(value, str) else [""]
    if not value or any(not p or p in (".", "..") or "\\" in p for p in parts):
        raise InvalidName(f"{what} {value!r} is not a relative path like 'name' or 'dir/name.parquet'")
    return value


# ---------------------------------------------------------------------------------------
# The records


class FileEntry(BaseModel):
    """One stored file: its path relative to the stage's folder, its size in bytes and sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """A committed stage output (see the module docstring). ``ref`` is ``"stage/key"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = MANIFEST_FORMAT
    stage: str
    key: str
    files: dict[str, FileEntry]
    config: dict[str, Any]
    inputs: list[str]
    input_digests: dict[str, str]
    metrics: dict[str, Any]
    code_version: str
    created_at: str
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.key}"

    @classmethod
    def build(
        cls,
        *,
        stage: str,
        key: str,
        files: Mapping[str, FileEntry],
        config: Mapping[str, Any],
        inputs: Sequence["Manifest"],
        metrics: Mapping[str, Any] | None,
        code_version: str,
    ) -> "Manifest":
        body = {
            "format": MANIFEST_FORMAT,
            "stage": stage,
            "key": key,
            "files": {name: entry.model_dump() for name, entry in sorted(files.items())},
            "config": to_jsonable(dict(config), "config"),
            "inputs": [m.ref for m in inputs],
            "input_digests": {m.ref: m.digest for m in inputs},
            "metrics": to_jsonable(dict(metrics or {}), "metrics"),
            "code_version": code_version,
            "created_at": utc_now(),
        }
        return cls(**body, digest=sha256_hex(canonical_json(body)))

    def content_digest(self) -> str:
        """sha256 of the canonical JSON of every field but ``digest``."""
        return sha256_hex(canonical_json(self.model_dump(exclude={"digest"})))

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        """Parse and check a stored manifest; a torn or edited one is an :class:`IntegrityError`."""
        try:
            manifest = cls.model_validate_json(data)
        except ValueError as error:
            raise IntegrityError(
                f"{where} is not a valid manifest ({str(error).splitlines()[0]}); "
                "delete that stage folder and re-run the stage"
            ) from None
        if manifest.content_digest() != manifest.digest:
            raise IntegrityError(
                f"{where} was modified after commit (its digest {manifest.digest[:12]} does not match "
                f"its content {manifest.content_digest()[:12]}); delete that stage folder and re-run the stage"
            )
        return manifest


def check_file(ref: str, name: str, path: str, entry: FileEntry, size: int, digest: str) -> None:
    """Raise IntegrityError naming the file when ``size``/``digest`` differ from the manifest's."""
    if size != entry.size or digest != entry.sha256:
        what = f"size {size} != {entry.size}" if size != entry.size else f"sha256 {digest[:12]}… != {entry.sha256[:12]}…"
        raise IntegrityError(
            f"file {name!r} of {ref} at {path} is corrupt ({what} recorded in its manifest); "
            "delete that folder and re-run the stage"
        )


def stage_key(stage: str, config: Mapping[str, Any], inputs: Sequence[Manifest], code_version: str) -> str:
    """Content address of a stage run: same stage, config, inputs and code -> same key."""
    body = {
        "stage": check_segment(stage, "stage name"),
        "config": to_jsonable(dict(config), "config"),
        "inputs": [m.digest for m in inputs],
        "code_version": code_version,
    }
    return sha256_hex(canonical_json(body))[:KEY_HEX_CHARS]
