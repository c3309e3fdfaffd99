"""``fewstep evaluate`` as a user runs it: through ``flows.cli.main``, on a tiny stored run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "workers"))

from evaluate_fixtures import commit_tiny_run  # noqa: E402

from flows.cli import main  # noqa: E402
from infra.store import Store  # noqa: E402

pytestmark = pytest.mark.timeout(600)

TINY_CONFIG = """\
evaluate:
  n: 32
  flow_solvers: [euler]
  guidance: [1]
features:
  steps: 30
  batch_size: 32
"""


def fewstep(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code or 0, out, err


@pytest.fixture(scope="module")
def ray_started():
    import ray

    from workers.runtime import ensure_ray, shutdown_ray

    started = not ray.is_initialized()
    ensure_ray()
    yield
    if started:
        shutdown_ray()  # also forgets RAY_ADDRESS, so a later fixture starts its own


def test_evaluates_the_latest_run_and_prints_the_table(ray_started, tmp_path, capsys):
    store = Store.open(str(tmp_path / "store"))
    run = commit_tiny_run(store)
    # The latest run produced base and consistency only: the reflow model is not evaluated.
    store.record_run("older", {"base": run.base.ref, "reflow_1": run.reflow.ref})
    store.record_run("latest", {"images": run.images.ref, "base": run.base.ref, "consistency": run.consistency.ref})
    config = tmp_path / "evaluate.yaml"
    config.write_text(TINY_CONFIG)

    code, out, err = fewstep(capsys, "evaluate", "--store", store.uri, "--config", str(config), "--steps", "2,1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["MODEL", "SAMPLER", "STEPS", "NFE", "GUIDANCE", "FID"]
    models = [
        line.split()[:3]
        for line in lines[1:]
        if line.strip() and not line.startswith(("evaluate/", "feature space", "report"))
    ]
    assert models == [
        ["real-train", "reference", "0"],
        ["vae-recon", "reference", "0"],
        ["base", "euler", "1"],
        ["base", "euler", "2"],
        ["consistency", "consistency", "1"],
        ["consistency", "consistency", "2"],
    ]
    report = next(line for line in lines if line.startswith("report: ")).removeprefix("report: ")
    assert Path(report).is_file() and "# fewstep evaluation" in Path(report).read_text()
    assert "test accuracy" in out

    # --model picks models explicitly; an evaluation already committed comes back at once.
    code, out, err = fewstep(
        capsys, "evaluate", "--store", store.uri, "--config", str(config), "--steps", "1", "--model", run.reflow.ref
    )
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["real-train", "vae-recon", "reflow-1"]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    code, _, err = fewstep(capsys, "evaluate", "--store", str(tmp_path / "empty"))
    assert code == 2 and "holds no generator models" in err and "Traceback" not in err
    code, _, err = fewstep(capsys, "evaluate", "--store", str(tmp_path / "empty"), "--steps", "1,two")
    assert code == 2 and "--steps '1,two'" in err
    code, _, err = fewstep(capsys, "evaluate", "--store", str(tmp_path / "empty"), "--model", "base/0123456789abcdef")
    assert code == 2 and "is not committed" in err
    code, _, err = fewstep(capsys, "evaluate", "--store", str(tmp_path / "empty"), "--preset", "nope")
    assert code == 2 and "unknown preset" in err
