"""``CODE_VERSION``: the package version plus a digest of the code that shapes stage outputs.

    CODE_VERSION = "<package version>+src.<first 12 hex of sha256 over models/, infra/, workers/>"

It is mixed into every stage key, so editing the math, the store or a Ray stage re-runs the
stages after the edit instead of returning outputs made by older code. ``flows/`` (orchestration,
CLI) is left out: it decides what runs, not what a stage writes. The digest covers each ``.py``
file's path and bytes, in sorted order, so it is the same on every machine with the same source.
Set ``FEWSTEP_CODE_VERSION`` to pin it (e.g. to reuse a store across a comment-only edit).
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

SOURCE_PACKAGES = ("models", "infra", "workers")
ENV_OVERRIDE = "FEWSTEP_CODE_VERSION"


def source_digest(root: Path, packages: tuple[str, ...] = SOURCE_PACKAGES) -> str:
    """sha256 over (relative path, bytes) of every ``.py`` file under ``root/<package>``."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def package_version() -> str:
    try:
        return metadata.version("fewstep")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


def code_version() -> str:
    pinned = os.environ.get(ENV_OVERRIDE)
    if pinned:
        return pinned
    root = Path(__file__).resolve().parent.parent
    return f"{package_version()}+src.{source_digest(root)[:12]}"


CODE_VERSION = code_version()
