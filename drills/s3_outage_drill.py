"""Fault drill: the S3 endpoint goes away mid-stage (refused or hung) and comes back.

    python -m drills.s3_outage_drill [--scope pipeline|stages] [--config tiny|micro] [--workdir DIR] [--json]

A store on moto's S3 server (its own instance), reached through a TCP relay that can refuse
connections; a "hang" outage SIGSTOPs moto instead (connections accepted, nothing answered).
An outage starts at the first S3 traffic after it is due, so it cuts requests, not idle time.

``--scope pipeline`` (the default) runs ``fewstep run --preset quick --config <config>`` with
the store on that endpoint and these outages, each counted from its stage's start:

    vae          refused   4 s   (inside the store's own retries, or one Prefect task retry)
    base         refused  20 s   (beyond the store's retries: Ray Train or Prefect retries)
    pairs        refused 120 s   (beyond every retry: the run must fail with a clear message)
    reflow       refused  60 s   (in the re-run; Ray Train restarts its workers, Prefect its task)
    consistency  hung     15 s   (in the re-run: requests wait, then complete)

When a run fails, it is re-run after the endpoint is back (as a user would), until one
finishes. ``--scope stages`` is the fast variant (the tests'): ingest, vae and latents called
in this process, a refused endpoint for 4 s inside vae and for 60 s inside latents, then the
same calls again.

Violations (exit status 1): a failure that is not a transient store error, a failed run that
does not end on one ``fewstep: error:`` line with exit status 2, a run after the outages that
does not complete, a torn manifest, a stage with more than one manifest, a manifest that
changed after it was committed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from drills.kit import (
    CONFIGS,
    KILLABLE,
    STAGES,
    MotoServer,
    PrefectServer,
    TcpRelay,
    WatchedRun,
    audit_store,
    emit,
    ensure_ray_cluster,
    log,
    run_env,
)

RUN_TIMEOUT_S = 1800.0
TRAFFIC_WAIT_S = 120.0  # an outage starts at the first S3 traffic after it is due (or after this)


@dataclass(frozen=True)
class Outage:
    stage: str  # counted from this stage's start
    after_s: float
    kind: str  # "refuse" (the relay is down) or "hang" (moto is SIGSTOPped)
    seconds: float


PIPELINE_OUTAGES = (
    Outage("vae", 3.0, "refuse", 4.0),
    Outage("base", 5.0, "refuse", 20.0),
    Outage("pairs", 0.5, "refuse", 120.0),
    Outage("reflow", 3.0, "refuse", 60.0),
    Outage("consistency", 3.0, "hang", 15.0),
)
STAGE_OUTAGES = (Outage("vae", 2.0, "refuse", 4.0), Outage("latents", 1.0, "refuse", 60.0))


@dataclass
class OutageRecord:
    stage: str
    kind: str
    seconds: float
    run: int = -1
    began_at_s: float | None = None  # seconds into the run
    outcome: str = "not reached"  # "retried success" | "clear transient error" | "unclear failure: ..." | "not reached"
    stage_done_after_restore_s: float | None = None
    error: str = ""


class Fault:
    """One outage at a time, switched on and off on a timer thread."""

    def __init__(self, moto: MotoServer, relay: TcpRelay):
        self.moto, self.relay = moto, relay
        self.active: threading.Event = threading.Event()
        self.restored_at: float | None = None

    def start(self, outage: Outage, on_restore: Callable[[], None] | None = None) -> None:
        def body() -> None:
            # Cut while S3 is in use (the next request after the outage is due), not between requests.
            self.relay.wait_for_traffic(TRAFFIC_WAIT_S)
            try:
                (self.relay.down if outage.kind == "refuse" else self.moto.pause)()
                log(f"S3 {outage.kind} for {outage.seconds:.0f} s (during {outage.stage})")
                time.sleep(outage.seconds)
            finally:
                (self.relay.up if outage.kind == "refuse" else self.moto.resume)()
                self.restored_at = time.monotonic()
                log("S3 back")
                self.active.clear()
            if on_restore:
                on_restore()

        self.active.set()
        threading.Thread(target=body, daemon=True).start()

    def wait_restored(self) -> None:
        while self.active.is_set():
            time.sleep(0.2)


def stage_index(stage: str) -> int:
    return KILLABLE.index(stage)


# --------------------------------------------------------------------------- the pipeline, through the CLI


def pipeline_drill(config_name: str, workdir: Path, moto: MotoServer, relay: TcpRelay, store_uri: str) -> dict:
    from infra.store import Store

    config_path = workdir / f"{config_name}.yaml"
    config_path.write_text(yaml.safe_dump(CONFIGS[config_name]))
    ray_address = ensure_ray_cluster()
    server = PrefectServer(workdir / "prefect")
    env = run_env(server.url, {"RAY_ADDRESS": ray_address, **moto.env(relay.url)})
    store = Store.open(store_uri, endpoint_url=moto.url, access_key_id=moto.KEY, secret_access_key=moto.SECRET)
    args = ["--preset", "quick", "--config", str(config_path), "--store", store_uri]
    fault = Fault(moto, relay)
    records = [OutageRecord(o.stage, o.kind, o.seconds) for o in PIPELINE_OUTAGES]
    runs: list[dict] = []
    violations: list[str] = []
    committed: dict[str, str] = {}
    pending = list(zip(PIPELINE_OUTAGES, records))
    try:
        for index in range(len(PIPELINE_OUTAGES) + 2):
            run = WatchedRun(args, env, workdir / f"run-{index:02d}.log")
            armed: tuple[Outage, OutageRecord, float] | None = None  # (outage, record, when to fire)
            current: OutageRecord | None = None
            while True:
                event = run.next_event(timeout=0.2)
                if (
                    event is not None
                    and event.kind == "start"
                    and pending
                    and armed is None
                    and stage_index(event.stage) >= stage_index(pending[0][0].stage)
                ):
                    outage, record = pending.pop(0)
                    armed = (outage, record, time.monotonic() + outage.after_s)
                if armed is not None and time.monotonic() >= armed[2] and not fault.active.is_set():
                    outage, current, _ = armed
                    current.run, current.began_at_s = index, round(run.elapsed(), 1)
                    current.stage = next((e.stage for e in reversed(run.history) if e.kind == "start"), outage.stage)
                    fault.start(outage)
                    armed = None
                if event is not None and event.kind == "done" and current is not None and event.stage == current.stage:
                    fault.wait_restored()
                    current.outcome = "retried success"
                    current.stage_done_after_restore_s = round(time.monotonic() - fault.restored_at, 1)
                    current = None
                if run.process.poll() is not None and run.events.empty():
                    break
                if run.elapsed() > RUN_TIMEOUT_S:
                    run.kill()
                    violations.append(f"run {index} did not finish within {RUN_TIMEOUT_S:.0f} s")
                    break
            code = run.wait(60)
            output = run.log_path.read_text()
            lines = output.splitlines()
            # The CLI's own last word (Ray's and Prefect's log lines may follow or precede it).
            last = next((line for line in reversed(lines) if line.startswith("fewstep: error:")), "") or next(
                (line for line in reversed(lines) if line.strip()), ""
            )
            runs.append(
                {
                    "index": index,
                    "exit_code": code,
                    "wall_s": round(run.elapsed(), 1),
                    "last_line": last,
                    "tracebacks_in_output": output.count("Traceback (most recent call last)"),
                }
            )
            log(f"run {index}: exit {code} after {run.elapsed():.0f} s: {last[:160]}")
            if code != 0:
                clear = code == 2 and last.startswith("fewstep: error:") and "transient" in last
                if current is not None:
                    current.outcome = (
                        "clear transient error" if clear else f"unclear failure: exit {code}: {last[:200]}"
                    )
                    current.error = last
                    current = None
                if not clear:
                    violations.append(f"run {index} failed without a clear transient error: exit {code}: {last[:300]}")
                if armed is not None:  # the run ended before its next outage fired: fire it in the re-run
                    pending.insert(0, armed[:2])
                fault.wait_restored()
            audit = audit_store(store)
            violations += audit.violations(f"after run {index}", committed)
            committed.update(audit.created)
            if code == 0:
                break
    finally:
        fault.wait_restored()
        server.stop()
    final = audit_store(store)
    missing = sorted(set(STAGES) - set(final.per_stage))
    if missing:
        violations.append(f"stages never committed: {missing}")
    if not runs or runs[-1]["exit_code"] != 0:
        violations.append("no run completed after the outages")
    violations += [f"outage in {r.stage}: {r.outcome}" for r in records if r.outcome.startswith("unclear")]
    return result("pipeline", config_name, records, runs, final, violations)


# --------------------------------------------------------------------------- stages, in this process


def stages_drill(workdir: Path, moto: MotoServer, relay: TcpRelay, store_uri: str) -> dict:
    from flows.cli import user_cause
    from infra.config import IngestConfig, LatentsConfig, VAEConfig
    from infra.store import Store
    from workers import progress
    from workers.errors import is_transient
    from workers.stages.s01_ingest import run_ingest
    from workers.stages.s02_vae import run_vae
    from workers.stages.s03_latents import run_latents

    ensure_ray_cluster()
    store = Store.open(store_uri, endpoint_url=relay.url, access_key_id=moto.KEY, secret_access_key=moto.SECRET)
    direct = Store.open(store_uri, endpoint_url=moto.url, access_key_id=moto.KEY, secret_access_key=moto.SECRET)
    fault = Fault(moto, relay)
    outages = {o.stage: o for o in STAGE_OUTAGES}
    records = {o.stage: OutageRecord(o.stage, o.kind, o.seconds) for o in STAGE_OUTAGES}
    started = time.monotonic()

    class Listener:  # fires the stage's outage ``after_s`` after it starts
        def started(self, stage: str) -> None:
            outage = outages.pop(stage, None)
            if outage is not None:

                def fire() -> None:
                    time.sleep(outage.after_s)
                    records[stage].run, records[stage].began_at_s = 0, round(time.monotonic() - started, 1)
                    fault.start(outage)

                threading.Thread(target=fire, daemon=True).start()

        def reused(self, stage, manifest) -> None: ...
        def finished(self, stage, manifest) -> None: ...
        def advanced(self, stage, done, total, note) -> None: ...

    ingest = IngestConfig(source="digits", limit=120, image_size=8)
    vae = VAEConfig(steps=12, base_channels=8, batch_size=32, checkpoint_every=4, warmup_steps=2)
    latents = LatentsConfig(batch_size=32)
    steps: list[tuple[str, Callable]] = [
        ("ingest", lambda s: [run_ingest(s, ingest)]),
        ("vae", lambda s: [run_vae(s, vae, s.get_ref(refs["ingest"]))]),
        ("latents", lambda s: [run_latents(s, latents, s.get_ref(refs["ingest"]), s.get_ref(refs["vae"]))]),
    ]
    refs: dict[str, str] = {}
    runs: list[dict] = []
    violations: list[str] = []
    committed: dict[str, str] = {}
    progress.listen(Listener())
    try:
        for index in range(3):
            run_started = time.monotonic()
            failure = None
            for stage, call in steps:
                if stage in refs:
                    continue
                try:
                    refs[stage] = call(store)[0].ref
                except Exception as error:  # noqa: BLE001 - the drill classifies every failure
                    failure = (stage, error)
                    break
                record = records.get(stage)
                if record is not None and record.began_at_s is not None and record.run == index:
                    fault.wait_restored()
                    record.outcome = "retried success"
                    record.stage_done_after_restore_s = round(time.monotonic() - fault.restored_at, 1)
            entry = {
                "index": index,
                "wall_s": round(time.monotonic() - run_started, 1),
                "failed_stage": None,
                "error": "",
            }
            if failure is not None:
                stage, error = failure
                cause = user_cause(error)
                message = str(cause) if cause is not None else f"{type(error).__name__}: {error}"
                clear = cause is not None and is_transient(error) and "\n" not in message
                entry.update(failed_stage=stage, error=message[:400], transient=is_transient(error))
                record = records.get(stage)
                if record is not None and record.run == index:
                    record.outcome = "clear transient error" if clear else f"unclear failure: {message[:200]}"
                    record.error = message[:400]
                if not clear:
                    violations.append(f"run {index}: {stage} failed without a clear transient error: {message[:300]}")
                fault.wait_restored()
            runs.append(entry)
            log(f"run {index}: {'failed in ' + failure[0] if failure else 'complete'} after {entry['wall_s']} s")
            audit = audit_store(direct)
            violations += audit.violations(f"after run {index}", committed)
            committed.update(audit.created)
            if failure is None:
                break
    finally:
        progress.listen(None)
        fault.wait_restored()
    final = audit_store(direct)
    if set(final.per_stage) != {"ingest", "vae", "latents"}:
        violations.append(f"committed stages: {sorted(final.per_stage)}, expected ingest, vae, latents")
    if not runs or runs[-1]["failed_stage"] is not None:
        violations.append("no run completed after the outages")
    return result("stages", "in-process ingest/vae/latents", list(records.values()), runs, final, violations)


# --------------------------------------------------------------------------- report


def result(
    scope: str, config: str, records: list[OutageRecord], runs: list[dict], final, violations: list[str]
) -> dict:
    return {
        "drill": "s3-outage",
        "scope": scope,
        "config": config,
        "outages": [asdict(r) for r in records],
        "runs": runs,
        "retried_successes": sum(r.outcome == "retried success" for r in records),
        "clear_transient_errors": sum(r.outcome == "clear transient error" for r in records),
        "manifests": final.manifests,
        "verified": final.verified,
        "torn": len(final.torn),
        "duplicate_commits": sum(n - 1 for n in final.per_inputs.values()),
        "per_stage": final.per_stage,
        "staging_attempts_left": final.staging_attempts,
        "completed": bool(runs) and (runs[-1].get("exit_code", 0) == 0 and not runs[-1].get("failed_stage")),
        "violations": violations,
    }


def summary(res: dict) -> list[str]:
    lines = [
        f"S3 outage drill ({res['scope']}, {res['config']}): {res['retried_successes']} retried successes, "
        f"{res['clear_transient_errors']} clear transient errors, completed: {res['completed']}",
        "",
        f"  {'STAGE':<12} {'KIND':<7} {'SECONDS':>7} {'RUN':>3} {'AT':>7}  OUTCOME",
    ]
    for r in res["outages"]:
        at = "" if r["began_at_s"] is None else f"{r['began_at_s']:.1f} s"
        after = (
            ""
            if r["stage_done_after_restore_s"] is None
            else f" (committed {r['stage_done_after_restore_s']} s after S3 came back)"
        )
        lines.append(
            f"  {r['stage']:<12} {r['kind']:<7} {r['seconds']:>7.0f} {r['run']:>3} {at:>7}  {r['outcome']}{after}"
        )
        if r["error"]:
            lines.append(f"  {'':<12} error: {r['error'][:160]}")
    lines += [""] + [
        f"  run {r['index']}: {r.get('exit_code', r.get('failed_stage') or 'ok')}, {r['wall_s']} s" for r in res["runs"]
    ]
    lines += [
        f"  manifests {res['manifests']}, verified {res['verified']}, torn {res['torn']}, "
        f"duplicate commits {res['duplicate_commits']}, staging attempts left for gc {res['staging_attempts_left']}",
        f"  violations: {len(res['violations'])}",
    ]
    lines += [f"    - {v}" for v in res["violations"]]
    return lines


def drill(scope: str, config_name: str, workdir: Path) -> dict:
    moto = MotoServer(workdir / "moto.log")
    relay = TcpRelay(moto.port)
    bucket = f"drill-{uuid.uuid4().hex[:10]}"
    moto.client().create_bucket(Bucket=bucket)
    store_uri = f"s3://{bucket}/store"
    started = time.monotonic()
    try:
        if scope == "pipeline":
            res = pipeline_drill(config_name, workdir, moto, relay, store_uri)
        else:
            res = stages_drill(workdir, moto, relay, store_uri)
    finally:
        relay.down()
        moto.stop()
    res["total_s"] = round(time.monotonic() - started, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scope", choices=("pipeline", "stages"), default="pipeline")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        res = drill(args.scope, args.config, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="fewstep-s3-drill-") as tmp:
            res = drill(args.scope, args.config, Path(tmp))
    emit(res, args.json, summary(res))
    return 1 if res["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
