"""Stage keys follow the code that shapes them: each stage module's import closure, not the package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.version import ROOT, import_closure, source_digest
from workers.stages import STAGE_MODULES

UPSTREAM = ("ingest", "vae", "latents")
GENERATORS = ("base", "ddpm", "pairs", "reflow", "consistency")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the package sources, to edit."""
    for package in ("models", "infra", "workers"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digests(root: Path) -> dict[str, str]:
    import_closure.cache_clear()  # closures are cached per (module, root)
    return {stage: source_digest(import_closure(module, root), root) for stage, module in STAGE_MODULES.items()}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_serving_change_rekeys_no_stage(tree):
    before = digests(tree)
    app = tree / "workers" / "serving" / "app.py"
    app.write_text(app.read_text() + "\n\ndef added_route():\n    return 1\n")
    assert digests(tree) == before


def test_a_dit_change_rekeys_base_and_below_but_not_ingest_vae_latents(tree):
    before = digests(tree)
    edit(tree / "models" / "dit.py", "def modulate(", "def _unused():\n    return 0\n\n\ndef modulate(")
    after = digests(tree)
    assert all(after[stage] == before[stage] for stage in UPSTREAM)
    # base and ddpm train the DiT; pairs, reflow and consistency load and run one (their inputs change too).
    assert all(after[stage] != before[stage] for stage in GENERATORS + ("evaluate",))


def test_comments_docstrings_and_formatting_rekey_nothing(tree):
    before = digests(tree)
    path = tree / "models" / "dit.py"
    text = path.read_text()
    path.write_text(
        '"""A new module docstring."""\n# a comment\n' + text.split('"""', 2)[2].replace("\n\n\n", "\n\n\n\n")
    )
    assert digests(tree) == before


def test_a_config_values_change_is_in_the_section_not_the_code(tree):
    """infra/config.py's source is key-neutral: its values are hashed per stage instead."""
    before = digests(tree)
    edit(
        tree / "infra" / "config.py", "class ServeConfig(Section):", "class ServeConfig(Section):\n    added: int = 1\n"
    )
    assert digests(tree) == before
