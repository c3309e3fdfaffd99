"""The one-way rule of DESIGN §1: math stays pure, Ray only in workers/, Prefect only in flows/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "models": {"ray", "prefect", "pyarrow", "s3fs", "fsspec", "boto3", "botocore", "fastapi",
               "safetensors", "pydantic", "logging", "requests", "httpx", "infra", "workers", "flows"},
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
    breaches = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in files
    }
    breaches = {file: names for file, names in breaches.items() if names}
    assert not breaches, f"layering broken: {breaches}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import ray.data\n    from prefect import flow\n")
    assert imported_roots(sample) == {"ray", "prefect"}
