"""The command line as a user meets it: help, bad config, errors from inside Ray tasks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from flows.cli import stop_signal, user_cause
from infra.config import ConfigError


def fewstep(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_help_lists_every_verb():
    done = fewstep("--help")
    assert done.returncode == 0
    for verb in ("run", "serve", "evaluate", "promote", "status", "gc", "unpin", "schedule", "watch"):
        assert verb in done.stdout


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("base:\n  stepz: 3\n", "unknown field 'base.stepz'"),
        ("base:\n  steps: -1\n", "base.steps = -1"),
        ("reflow:\n  rounds: many\n", "reflow.rounds = 'many'"),
        ("[1, 2]\n", "must hold a mapping"),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, yaml_text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    done = fewstep("run", "--config", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "store").exists(), "work started before the config was checked"


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("base:\n  model: DiT-ZZZ/2\n", "base.model = 'DiT-ZZZ/2'"),
        ("evaluate:\n  extractor: {tmp}/missing.pt\n", "evaluate.extractor = '{tmp}/missing.pt' is not a local file"),
        ("base:\n  lr: .inf\n", "base.lr = inf"),
        ("base:\n  steps: '100'\n", "base.steps = '100'"),
        ("evaluate:\n  n: 1000000000\n", "evaluate.n = 1000000000"),
        ("base:\n  steps: 10\n  steps: 20\n", "key 'steps' appears twice in one mapping (lines 2 and 3)"),
    ],
)
def test_config_errors_are_one_line_before_any_stage(tmp_path, yaml_text, expected):
    """Resolvable names and files are checked with the config: exit 2, one line, the store untouched."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text.format(tmp=tmp_path))
    done = fewstep("run", "--config", str(config), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), done.stderr
    assert expected.format(tmp=tmp_path) in lines[0], done.stderr
    assert not (tmp_path / "store").exists(), "work started before the config was checked"


def test_unknown_preset_and_missing_config_file(tmp_path):
    done = fewstep("run", "--preset", "fast", cwd=tmp_path)
    assert done.returncode == 2 and "unknown preset 'fast'" in done.stderr
    done = fewstep("run", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_a_user_error_raised_in_a_ray_task_reaches_the_user_as_its_own_message(ray_local):
    @ray_local.remote
    def stage():
        raise ConfigError("ingest: 3 of 8 images are unreadable, above max_bad_fraction=0.05")

    with pytest.raises(Exception) as caught:
        ray_local.get(stage.remote())
    cause = user_cause(caught.value)
    assert isinstance(cause, ConfigError)
    assert str(cause) == "ingest: 3 of 8 images are unreadable, above max_bad_fraction=0.05"
    assert user_cause(RuntimeError("a bug")) is None


# What Ray's Cython raises when Prefect's SIGTERM handler fires while the driver waits in ray.get
# (seen from `kill` during a base stage): a SystemError whose context is Prefect's signal.
SIGNAL_INSIDE_RAY = textwrap.dedent(
    """
    import sys
    from prefect.exceptions import TerminationSignal
    from flows.cli import app, main

    @app.command("stopped")
    def stopped() -> None:
        try:
            raise TerminationSignal(signal=15)
        except TerminationSignal:
            raise SystemError("<built-in method __new__> returned a result with an exception set")

    main(sys.argv[1:])
    """
)


def test_a_stop_signal_behind_another_error_ends_the_command_in_one_line():
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_INSIDE_RAY, "stopped"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        "fewstep: stopped by SIGTERM; committed stages are kept, and the same command resumes the run"
    )
    assert stop_signal(KeyboardInterrupt()) == signal.SIGINT
    assert stop_signal(RuntimeError("a bug")) is None


def test_a_mistyped_option_prints_usage_and_exits_2_through_the_console_script(tmp_path):
    import shutil

    script = shutil.which("fewstep")
    assert script, "the fewstep console script is not installed (pip install -e .)"
    done = subprocess.run([script, "serve", "--bogus"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Usage: fewstep serve" in done.stderr and "No such option: --bogus" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_store_outage_inside_ray_train_is_transient_and_reaches_the_user():
    """Ray Train's WorkerGroupError carries each worker's exception, not a __cause__ (S3 drill finding)."""
    from ray.train import WorkerGroupError

    from infra.errors import StoreUnavailable
    from workers.errors import is_transient

    outage = StoreUnavailable(
        "list s3://b/store/checkpoints at http://127.0.0.1:1 failed 5 times with transient errors"
    )
    failed = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: outage, 1: outage})
    assert is_transient(failed), "Prefect would not retry a stage that lost S3 for a moment"
    assert user_cause(failed) is outage
    bug = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: outage, 1: ValueError("a bug")})
    assert not is_transient(bug) and user_cause(bug) is outage
    assert not is_transient(WorkerGroupError("...", {0: ValueError("a bug")}))
    assert user_cause(WorkerGroupError("...", {0: ValueError("a bug")})) is None


def test_a_store_outage_inside_a_ray_data_read_fails_the_stage_in_one_line(ray_local, local_store):
    """S3 drill finding: Ray Data's ListFiles task hit the outage and the stage failed with the
    remote traceback. The stage now says it in one transient line and commits nothing."""
    import pyarrow.fs as pafs
    import ray

    from infra.cards import Card
    from infra.errors import StoreUnavailable
    from workers.errors import is_transient
    from workers.runner import run_stage

    @ray.remote
    def list_files() -> None:  # what a read does first: ask S3 about a key, here at a dead port
        fs = pafs.S3FileSystem(
            endpoint_override="http://127.0.0.1:1",
            scheme="http",
            access_key="k",
            secret_key="s",
            region="us-east-1",
            connect_timeout=1,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        fs.get_file_info(["bucket/images/part-00000.parquet"])

    def build(writer, key) -> Card:
        ray.get(list_files.remote())
        raise AssertionError("the read should have failed")

    with pytest.raises(StoreUnavailable) as caught:
        run_stage(local_store, "latents", {"batch_size": 1}, [], build, source="workers.runner")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("latents: the artifact store failed")
    assert "NETWORK_CONNECTION" in message and "run again" in message
    assert is_transient(caught.value) and user_cause(caught.value) is caught.value
    assert local_store.list_manifests("latents") == []

    def bug(writer, key) -> Card:
        ray.get(ray.remote(lambda: 1 / 0).remote())
        raise AssertionError("unreachable")

    with pytest.raises(ray.exceptions.RayTaskError):  # a bug stays a bug: no store words put on it
        run_stage(local_store, "latents", {"batch_size": 2}, [], bug, source="workers.runner")
