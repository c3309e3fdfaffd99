"""Code versions: a digest of the code that shapes a stage's output, mixed into its stage key.

    code_version("workers.stages.s04_base") = "<package version>+src.<12 hex of sha256 over
        the base stage module and every fewstep module it imports, transitively>"

A stage is keyed by its own import closure inside the package (``models``, ``infra``,
``workers``), found by reading import statements (also those inside functions), so:

- editing the serving code re-keys no stage (no stage imports it);
- editing the DiT re-keys base and the stages below it (their closures, or their inputs'
  keys, include it), but not ingest, vae or latents;
- a comment, a docstring or a re-formatting re-keys nothing: each module is hashed as its
  syntax tree without docstrings.

Modules whose source cannot change an output are left out (:data:`KEY_NEUTRAL`): the config
module (each stage hashes its section's *values* instead), error types, Ray start-up and
progress reporting. What they import is not followed either (the config module checks model
names against ``models.dit``; that must not key ingest on the DiT): a stage that uses a module
imports it itself. ``CODE_VERSION`` is the same digest over the whole package, for
``fewstep version`` and for stores written without a stage module. Set
``FEWSTEP_CODE_VERSION`` to pin every version (e.g. to reuse a store across a refactor).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from importlib import metadata
from pathlib import Path

SOURCE_PACKAGES = ("models", "infra", "workers")
ENV_OVERRIDE = "FEWSTEP_CODE_VERSION"
ROOT = Path(__file__).resolve().parent.parent

# Their source never shapes a stage's output (see the module docstring).
KEY_NEUTRAL = frozenset(
    {
        "infra",
        "models",
        "workers",
        "workers.stages",
        "workers.sources",  # package docstrings
        "infra.config",
        "infra.errors",
        "infra.version",
        "workers.errors",
        "workers.runtime",
        "workers.progress",
    }
)


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """The file of package module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py), or None."""
    parts = name.split(".")
    if parts[0] not in SOURCE_PACKAGES:
        return None
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(name: str, root: Path = ROOT) -> set[str]:
    """Package modules that module ``name`` imports anywhere in its body, and their parent packages."""
    path = module_path(name, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    closure = set()
    for module in found:
        parts = module.split(".")
        closure.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in closure if module_path(m, root) is not None}


@functools.cache
def import_closure(name: str, root: Path = ROOT) -> tuple[str, ...]:
    """``name`` and every package module it reaches through imports, sorted."""
    if module_path(name, root) is None:
        raise ValueError(f"{name!r} is not a module of {', '.join(SOURCE_PACKAGES)} under {root}")
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module in KEY_NEUTRAL and module != name:
            continue  # a neutral module's imports shape no output through it
        todo.extend(imported_modules(module, root) - seen)
    return tuple(sorted(seen))


def normalized_source(path: Path) -> str:
    """The module's syntax tree without docstrings: comments and formatting do not count."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def source_digest(modules: tuple[str, ...], root: Path = ROOT) -> str:
    """sha256 over (module name, normalized source) of ``modules`` minus :data:`KEY_NEUTRAL`."""
    digest = hashlib.sha256()
    for module in sorted(set(modules) - KEY_NEUTRAL):
        digest.update(module.encode() + b"\0" + normalized_source(module_path(module, root)).encode() + b"\0")
    return digest.hexdigest()


def package_version() -> str:
    try:
        return metadata.version("fewstep")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


def all_modules(root: Path = ROOT) -> tuple[str, ...]:
    names = []
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return tuple(names)


@functools.cache
def code_version(module: str | None = None) -> str:
    """The version of the code behind stage module ``module`` (None: the whole package)."""
    pinned = os.environ.get(ENV_OVERRIDE)
    if pinned:
        return pinned
    modules = all_modules() if module is None else import_closure(module)
    return f"{package_version()}+src.{source_digest(modules)[:12]}"


CODE_VERSION = code_version()
