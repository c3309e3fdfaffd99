"""New data as a trigger: ``fewstep schedule --on-new-data`` and ``fewstep watch`` on the session's Prefect server.

The server is a real ``prefect server start`` (tests/conftest.py), which runs Prefect's event
services: the triggers service matches events against automations and the actions service runs
the deployment. The deployment is registered by the CLI itself (``--register-only``), so the
trigger under test is the one a user gets; no runner executes the triggered run (the pipeline
is not under test here), so the test reads the run the automation created.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image

from flows.trigger import EVENT, emit, landed_event, resource_id, source_uri

WAIT_S = 120  # for the server's services to act on an event; never asserted as a timing


def write_png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def fewstep(*args: str, api_url: str | None, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def wait_for(read, done, what: str):
    deadline = time.monotonic() + WAIT_S
    while True:
        found = read()
        if done(found) or time.monotonic() > deadline:
            assert done(found), f"{what}: got {found}"
            return found
        time.sleep(1)


def triggered_runs(server, deployment_id: str) -> list[dict]:
    """The deployment's runs that no cron made (the scheduler's are auto_scheduled)."""
    runs = server.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    return [run for run in runs if not run["auto_scheduled"]]


def landed_events(server, source: str) -> list[dict]:
    page = server.api(
        "/events/filter", {"filter": {"event": {"name": [EVENT]}, "resource": {"id": [resource_id(source)]}}}
    )
    return sorted(page["events"], key=lambda e: e["occurred"])


def test_one_source_has_one_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    absolute = str(tmp_path / "images")
    assert source_uri("images") == source_uri("./images/") == source_uri(absolute + "/") == absolute
    assert source_uri("s3a://bucket/week/") == source_uri("s3://bucket/week") == "s3://bucket/week"
    assert source_uri("s3://bucket/week") != source_uri("s3://bucket/week2")
    assert resource_id("images") == "fewstep.source." + absolute


def test_an_event_for_the_source_runs_the_deployment_and_one_for_another_does_not(prefect_server, tmp_path):
    source = tmp_path / "week [1]"  # glob characters: the trigger must match this path and only it
    write_png(source / "a.png", 10)
    config = tmp_path / "fewstep.yaml"
    config.write_text(f"ingest:\n  source: '{source}'\n")
    name = f"on-data-{uuid.uuid4().hex[:8]}"
    registered = fewstep(
        "schedule",
        "--cron",
        "0 3 * * 0",
        "--on-new-data",
        "--register-only",
        "--preset",
        "quick",
        "--config",
        str(config),
        "--store",
        str(tmp_path / "store"),
        "--name",
        name,
        api_url=prefect_server.url,
        cwd=tmp_path,
    )
    assert registered.returncode == 0, registered.stderr
    assert f"on {EVENT} for {resource_id(str(source))}" in registered.stdout, registered.stdout
    deployment = prefect_server.api(f"/deployments/name/pipeline/{name}", method="GET")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 0"]  # the cron stays

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        # Another source first (a sibling, and a path this one's glob would match if unescaped), then ours.
        emit(landed_event(str(tmp_path / "week 1"), "elsewhere", 1))
        emit(landed_event(str(tmp_path / "other"), "elsewhere", 1))
        emit(landed_event(str(source) + "/", "ours", 1))  # another spelling of the same folder
        runs = wait_for(
            lambda: triggered_runs(prefect_server, deployment["id"]), bool, "a run of the deployment after the event"
        )
        # The triggers service reads the events in order: ours fired, so the two before it were seen.
        assert len(runs) == 1, runs
        # The run is the deployment's own run (as the cron's): ingest lists the source and keys by it.
        assert runs[0]["parameters"] == deployment["parameters"]

        emit(landed_event(str(tmp_path / "other"), "elsewhere", 2))
        emit(landed_event(str(source), "ours again", 2))
        runs = wait_for(lambda: triggered_runs(prefect_server, deployment["id"]), lambda r: len(r) >= 2, "two runs")
        assert len(runs) == 2, runs


def test_the_watcher_sends_one_event_per_change_of_the_listing(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli.watch import Watcher
    from infra.store import Store

    source = tmp_path / "images"
    write_png(source / "cats" / "a.png", 10)
    watcher = Watcher(str(source), Store.open(str(tmp_path / "store")))
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        assert watcher.poll() is None  # the baseline sends nothing
        assert watcher.poll() is None  # nor does an unchanged listing

        write_png(source / "cats" / "b.png", 20)
        assert watcher.poll() is None  # changed: waits for it to hold still one poll
        first = watcher.poll()
        assert first is not None
        assert watcher.poll() is None and watcher.poll() is None  # sent once

        (source / "notes.txt").write_text("not an image: ingest does not read it")
        assert watcher.poll() is None and watcher.poll() is None

        write_png(source / "dogs" / "c.png", 30)
        write_png(source / "dogs" / "d.png", 40)
        assert watcher.poll() is None
        write_png(source / "dogs" / "e.png", 50)  # still copying: the change has not settled
        assert watcher.poll() is None
        second = watcher.poll()
        assert second is not None and second != first
        assert watcher.poll() is None

    assert watcher.sent == [first, second]
    events = wait_for(lambda: landed_events(prefect_server, str(source)), lambda e: len(e) >= 2, "two events")
    assert [e["payload"]["fingerprint"] for e in events] == [first, second]
    assert [e["payload"]["files"] for e in events] == [2, 5]
    assert events[0]["resource"]["prefect.resource.name"] == str(source)


@pytest.mark.parametrize(
    "args, api, expected",
    [
        (["watch", "digits"], True, "built-in set that never changes"),
        (["watch", "{tmp}/missing"], True, "does not exist"),
        (["watch", "{tmp}"], False, "set PREFECT_API_URL"),
        (
            ["schedule", "--cron", "0 3 * * 0", "--on-new-data", "--register-only", "--preset", "quick"],
            True,
            "built-in",
        ),
        (["schedule", "--cron", "0 3 * * 0", "--on-new-data", "--config", "{tmp}/c.yaml"], False, "PREFECT_API_URL"),
    ],
)
def test_what_a_trigger_cannot_work_with_is_refused_in_one_line(tmp_path, monkeypatch, capsys, args, api, expected):
    """In this process (main() is the console script) to spare the suite a Python start per case."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(f"ingest:\n  source: '{tmp_path}'\n")
    settings = (
        {"updates": {PREFECT_API_URL: "http://127.0.0.1:9/api"}} if api else {"restore_defaults": {PREFECT_API_URL}}
    )
    with temporary_settings(**settings), pytest.raises(SystemExit) as exit:  # refused before anything talks to it
        main([a.format(tmp=tmp_path) for a in args])
    stderr = capsys.readouterr().err
    assert exit.value.code == 2, stderr
    assert expected in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "fewstep-store").exists()
