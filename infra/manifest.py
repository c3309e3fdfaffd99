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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from infra.errors import IntegrityError, InvalidName

if TYPE_CHECKING:
    from infra.backends import Backend

MANIFEST = "manifest.json"  # the file name of every commit record
MANIFEST_FORMAT = "fewstep.manifest/1"
ATTEMPT_TIME = "%Y%m%dT%H%M%SZ"
KEY_HEX_CHARS = 16  # 64 bits: collisions need ~4e9 keys of one stage

SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


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
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime | None:
    """A time written by :func:`utc_now` (or any ISO-8601 string; naive means UTC); None if unparsable."""
    try:
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def new_attempt_id() -> str:
    """``20261126T145300Z-1a2b3c4d5e6f``: unique per writer, and its age is readable by ``fewstep gc``."""
    return f"{datetime.now(UTC).strftime(ATTEMPT_TIME)}-{uuid.uuid4().hex[:12]}"


def attempt_time(attempt: str) -> datetime | None:
    """When an attempt folder was started, from its name (None for names not made here)."""
    try:
        return datetime.strptime(attempt.split("-", 1)[0], ATTEMPT_TIME).replace(tzinfo=UTC)
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


def is_relative_path(value: object) -> bool:
    """``a/b.parquet``: no ``..`` or ``.`` parts, no leading ``/``, no empty parts, no backslashes or
    control characters. Such a path joined under a folder can never name anything outside it."""
    if not isinstance(value, str) or not value:
        return False
    parts = value.split("/")
    return not any(not p or p in (".", "..") or "\\" in p or any(ord(c) < 32 for c in p) for p in parts)


def split_ref(ref: str) -> tuple[str, str]:
    """``"vae/3f2a9c0d1e2b4a5c"`` -> ("vae", "3f2a9c0d1e2b4a5c"), each part a valid name."""
    stage, sep, key = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    if not sep:
        raise InvalidName(f"ref {ref!r} is not 'stage/key' (e.g. 'vae/3f2a9c0d1e2b4a5c'); `fewstep status` lists them")
    return check_segment(stage, "stage name"), check_segment(key, "stage key")


def check_relative_path(value: str, what: str) -> str:
    """A file name inside a stage output: ``a/b.parquet`` (see :func:`is_relative_path`)."""
    if not is_relative_path(value):
        raise InvalidName(f"{what} {value!r} is not a relative path like 'name' or 'dir/name.parquet'")
    return value


# ---------------------------------------------------------------------------------------
# The records


class FileEntry(BaseModel):
    """One stored file: its path relative to the stage's folder, its size in bytes and sha256.

    The path is checked when a manifest is loaded: a crafted entry (``../../x``, ``/etc/x``,
    ``a\\b``) fails validation, so no read ever leaves the stage folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_the_stage_folder(cls, path: str) -> str:
        if not is_relative_path(path):
            raise ValueError(
                f"path {path!r} is not a relative path inside the stage folder (no '..', no leading '/', no backslash)"
            )
        return path

    @field_validator("size")
    @classmethod
    def _not_negative(cls, size: int) -> int:
        if size < 0:
            raise ValueError(f"size {size} is negative")
        return size

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str) -> str:
        if not SHA256_HEX.match(digest):
            raise ValueError(f"sha256 {digest!r:.80} is not 64 lowercase hex digits")
        return digest


def describe_invalid(error: ValidationError) -> str:
    """The first problem pydantic found, with where it is: ``files.latents.path: path '../x' is ...``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


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

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not is_relative_path(name):
                raise ValueError(f"file name {name!r} is not a relative path like 'name' or 'dir/name.parquet'")
        return files

    @classmethod
    def build(
        cls,
        *,
        stage: str,
        key: str,
        files: Mapping[str, FileEntry],
        config: Mapping[str, Any],
        inputs: Sequence[Manifest],
        metrics: Mapping[str, Any] | None,
        code_version: str,
    ) -> Manifest:
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
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a stored manifest; a torn or edited one is an :class:`IntegrityError`."""
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as error:
            raise IntegrityError(
                f"{where} is not a valid manifest ({describe_invalid(error)}); "
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
        what = (
            f"size {size} != {entry.size}" if size != entry.size else f"sha256 {digest[:12]}… != {entry.sha256[:12]}…"
        )
        raise IntegrityError(
            f"file {name!r} of {ref} at {path} is corrupt ({what} recorded in its manifest); "
            "delete that folder and re-run the stage"
        )


def read_checked(backend: Backend, ref: str, name: str, path: str, entry: FileEntry, remedy: str) -> bytes:
    """The bytes at ``path``, checked against ``entry``; a missing file is an IntegrityError ending in ``remedy``."""
    try:
        data = backend.read_bytes(path)
    except FileNotFoundError:
        raise IntegrityError(f"file {name!r} of {ref} is missing at {path}; {remedy}") from None
    check_file(ref, name, path, entry, len(data), sha256_hex(data))
    return data


def stage_key(stage: str, config: Mapping[str, Any], inputs: Sequence[Manifest], code_version: str) -> str:
    """Content address of a stage run: same stage, config, inputs and code -> same key."""
    body = {
        "stage": check_segment(stage, "stage name"),
        "config": to_jsonable(dict(config), "config"),
        "inputs": [m.digest for m in inputs],
        "code_version": code_version,
    }
    return sha256_hex(canonical_json(body))[:KEY_HEX_CHARS]
