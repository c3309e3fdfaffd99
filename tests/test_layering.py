"""The one-way rule of DESIGN §1: math stays pure, Ray only in workers/, Prefect only in flows/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "models": {
        "ray",
        "prefect",
        "pyarrow",
        "s3fs",
        "fsspec",
        "boto3",
        "botocore",
        "fastapi",
        "safetensors",
        "pydantic",
        "logging",
        "requests",
        "httpx",
        "infra",
        "workers",
        "flows",
    },
    "infra": {"ray", "prefect", "workers", "flows", "fastapi"},
    "workers": {"prefect", "flows"},
    "flows": {"ray"},  # Ray is reached only through workers/
}


def imported_roots(path: Path) -> set[str]:
    """Top-level module names imported anywhere in a file (including inside functions)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package):
    files = package_files(package)
    assert files, f"{package}/ has no Python files"
    breaches = {str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package]) for path in files}
    breaches = {file: names for file, names in breaches.items() if names}
    assert not breaches, f"layering broken: {breaches}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import ray.data\n    from prefect import flow\n")
    assert imported_roots(sample) == {"ray", "prefect"}


def imported_modules(path: Path) -> set[str]:
    """Full dotted names imported anywhere in a file (``from a.b import c`` gives a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_stage_module_imports_another_stage_module():
    stages = sorted((ROOT / "workers" / "stages").glob("s[0-9][0-9]_*.py"))
    assert len(stages) >= 10, [p.name for p in stages]
    names = {f"workers.stages.{p.stem}" for p in stages}
    breaches = {p.name: sorted((imported_modules(p) & names) - {f"workers.stages.{p.stem}"}) for p in stages}
    breaches = {name: found for name, found in breaches.items() if found}
    assert not breaches, f"a stage imports another stage (move what they share into a library module): {breaches}"
    # ... nor does any library module of workers/ reach into a stage.
    libraries = [p for p in package_files("workers") if "stages" not in p.parts]
    leaks = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & names) for p in libraries}
    assert not {k: v for k, v in leaks.items() if v}, leaks


def test_the_stage_rule_sees_a_breach(tmp_path):
    sample = tmp_path / "s99_sample.py"
    sample.write_text("def f():\n    from workers.stages.s01_ingest import run_ingest\n")
    assert "workers.stages.s01_ingest" in imported_modules(sample)


def test_the_command_line_imports_explicitly():
    offenders = [str(p.relative_to(ROOT)) for p in package_files("flows") if "__import__(" in p.read_text()]
    assert not offenders, offenders
