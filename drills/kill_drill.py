"""Fault drill: SIGKILL the pipeline's driver at seeded random points in every stage, re-run each time.

    python -m drills.kill_drill [--kills 10] [--seed 0] [--config tiny|micro] [--workdir DIR] [--json]

One store, one local Ray (``RAY_ADDRESS`` if set, else started here), one ``prefect server``.
The kill points are drawn from ``--seed``: with ``--kills`` >= 10 every stage (ingest ... evaluate,
and promote) gets at least one, the rest at random; each is "``delay`` seconds after the stage
starts", the delay uniform in [0, a typical duration of that stage]. They are visited in pipeline
order by a chain of runs of ``fewstep run --preset quick --config <config>``: run k is started,
watched through its per-stage progress lines, and its whole process group SIGKILLed at kill
point k (or right after the stage commits, if it commits first). The last run must finish.

After every kill and at the end, every manifest under ``stages/`` is read and verified
(size + sha256 of every file), and these are violations (exit status 1):

- a torn manifest (unparsable, or a file missing or not matching its digest) or pointer;
- a stage committed before a kill whose manifest changed afterwards (``created_at``), or a
  stage with more than one manifest (recomputed under another key);
- a re-run that does not get past the point where the previous run was killed; a last run
  that fails; a missing stage or a serving pointer that is not the consistency model.

Printed: each kill point (target, where it landed, seconds into the stage), each re-run's
seconds to resume (start -> the first stage that runs), its wall time, and the counts.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from drills.kit import (
    CONFIGS,
    KILLABLE,
    STAGES,
    PrefectServer,
    WatchedRun,
    audit_store,
    emit,
    ensure_ray_cluster,
    log,
    run_env,
)

# Upper end of the kill delay per stage: about 3/4 of its duration with the tiny config on a
# loaded 2-core machine. On a faster machine more kills land right after a commit (reported).
TYPICAL_S = {
    "ingest": 15.0,
    "vae": 40.0,
    "latents": 15.0,
    "base": 45.0,
    "pairs": 6.0,
    "reflow": 45.0,
    "consistency": 45.0,
    "features": 15.0,
    "evaluate": 3.0,
    "promote": 1.0,
}
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class KillPoint:
    stage: str  # where to kill: a stage, or "promote" (after evaluate commits)
    delay_s: float  # seconds after that stage starts


@dataclass
class RunRecord:
    index: int
    target: str | None  # the kill point's stage; None for the last, unkilled run
    delay_s: float | None
    landed: str = ""  # "mid <stage>", "after <stage> committed", "finished"
    seconds_into_stage: float | None = None
    resume_s: float | None = None  # start -> the first stage that actually runs
    wall_s: float = 0.0
    reused: int = 0  # stages returned from the store
    exit_code: int | None = None


def plan_kills(kills: int, seed: int) -> list[KillPoint]:
    """``kills`` points in pipeline order; every killable stage at least once when kills >= 10."""
    rng = random.Random(seed)
    stages = list(KILLABLE) if kills >= len(KILLABLE) else rng.sample(KILLABLE, kills)
    stages += [rng.choice(KILLABLE) for _ in range(kills - len(stages))]
    stages.sort(key=KILLABLE.index)
    return [KillPoint(stage, round(rng.uniform(0.0, TYPICAL_S.get(stage, 15.0)), 2)) for stage in stages]


def steer(run: WatchedRun, point: KillPoint, record: RunRecord) -> None:
    """Wait for ``point`` in ``run``'s stage lines, then SIGKILL it (or see it finish first)."""
    target = KILLABLE.index(point.stage)
    trigger, running = None, None
    while trigger is None:
        event = run.next_event(timeout=1.0)
        if event is None:
            if run.process.poll() is not None:
                record.landed, record.exit_code = "finished", run.wait(60)
                return
            if run.elapsed() > RUN_TIMEOUT_S:
                break
            continue
        if event.kind == "reused":
            record.reused += 1
        if event.kind == "start":
            running = event.stage
            if record.resume_s is None:
                record.resume_s = event.t
        if point.stage == "promote":
            if event.stage == "evaluate" and event.kind in ("done", "reused"):
                trigger, running = event, "promote"
        elif event.kind == "start" and event.stage in KILLABLE and KILLABLE.index(event.stage) >= target:
            trigger = event
    deadline = time.monotonic() + (point.delay_s if trigger is not None else 0.0)
    landed = f"mid {running}"
    while time.monotonic() < deadline:
        event = run.next_event(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
        if event is not None and event.kind == "done" and event.stage == running:
            landed = f"after {running} committed"
            break
        if run.process.poll() is not None:
            break
    if run.process.poll() is not None:
        record.landed, record.exit_code = "finished", run.wait(60)
        return
    record.seconds_into_stage = round(run.elapsed() - trigger.t, 2) if trigger is not None else None
    run.kill()
    record.landed, record.exit_code = landed, -9


def drill(kills: int, seed: int, config_name: str, workdir: Path) -> dict:
    started = time.monotonic()
    config_path = workdir / f"{config_name}.yaml"
    config_path.write_text(yaml.safe_dump(CONFIGS[config_name]))
    store_uri = str(workdir / "store")
    ray_address = ensure_ray_cluster()
    log(f"Ray at {ray_address}; starting a prefect server")
    server = PrefectServer(workdir / "prefect")
    from infra.store import Store

    store = Store.open(store_uri)
    env = run_env(server.url, {"RAY_ADDRESS": ray_address})
    args = ["--preset", "quick", "--config", str(config_path), "--store", store_uri]
    plan = plan_kills(kills, seed)
    log("kill plan: " + ", ".join(f"{p.stage}+{p.delay_s}s" for p in plan))
    records: list[RunRecord] = []
    violations: list[str] = []
    committed: dict[str, str] = {}  # ref -> created_at, of everything committed so far
    try:
        for index, point in enumerate([*plan, None]):
            record = RunRecord(index, point.stage if point else None, point.delay_s if point else None)
            run = WatchedRun(args, env, workdir / f"run-{index:02d}.log")
            if point is not None:
                steer(run, point, record)
            else:
                while (event := run.next_event(timeout=1.0)) is not None or run.process.poll() is None:
                    if event is not None and event.kind == "start" and record.resume_s is None:
                        record.resume_s = event.t
                    if event is not None and event.kind == "reused":
                        record.reused += 1
                    if run.elapsed() > RUN_TIMEOUT_S:
                        run.kill()
                        break
                record.exit_code = run.wait(60)
                record.landed = "finished"
            record.wall_s = round(run.elapsed(), 1)
            records.append(record)
            audit = audit_store(store)
            log(
                f"run {index}: {record.landed} (target {record.target}+{record.delay_s}s), wall {record.wall_s}s, "
                f"resume {record.resume_s}s, {audit.verified}/{audit.manifests} manifests verified"
            )
            violations += audit.violations(f"after run {index}", committed)
            if point is None and record.exit_code != 0:
                violations.append(f"the last run failed with {record.exit_code}:\n" + "\n".join(run.tail[-25:]))
            if record.landed == "finished" and point is not None:
                log(f"run {index} finished before its kill point {point.stage}+{point.delay_s}s")
            committed.update(audit.created)
            if record.landed == "finished":
                break
    finally:
        server.stop()
    final = audit_store(store)
    missing = sorted(set(STAGES) - set(final.per_stage))
    if missing:
        violations.append(f"stages never committed: {missing}")
    consistency = [ref for ref in final.created if ref.startswith("consistency/")]
    if final.pointers.get("serving/current") not in consistency:
        violations.append(f"serving/current is {final.pointers.get('serving/current')}, not the consistency model")
    from infra.cards import GeneratorCard, VAECard

    cards = {"vae": VAECard, **{stage: GeneratorCard for stage in GeneratorCard.STAGES}}
    resumed = {
        ref: cards[ref.split("/")[0]].from_manifest(store.get_ref(ref)).resumed_from
        for ref in final.created
        if ref.split("/")[0] in cards
    }
    killed = [r for r in records if r.exit_code == -9]
    reruns = [r for r in records[1:]]
    return {
        "drill": "kill",
        "seed": seed,
        "config": config_name,
        "store": store_uri,
        "kills_planned": len(plan),
        "kills_done": len(killed),
        "kills_mid_stage": sum(r.landed.startswith("mid") for r in killed),
        "kills_after_commit": sum(r.landed.startswith("after") for r in killed),
        "stages_hit": sorted({r.landed.split()[1] for r in killed}, key=KILLABLE.index),
        "runs": [asdict(r) for r in records],
        "rerun_resume_s": [r.resume_s for r in reruns],
        "rerun_wall_s": [r.wall_s for r in reruns],
        "manifests": final.manifests,
        "verified": final.verified,
        "per_stage": final.per_stage,
        "torn": len(final.torn),
        "recomputed": sum("recomputed" in v for v in violations),
        "staging_attempts_left": final.staging_attempts,
        "tmp_files_left": final.tmp_files,
        "resumed_from": resumed,
        "total_s": round(time.monotonic() - started, 1),
        "violations": violations,
    }


def summary(result: dict) -> list[str]:
    lines = [
        f"kill drill: seed {result['seed']}, config {result['config']}, {result['kills_done']} of "
        f"{result['kills_planned']} kills ({result['kills_mid_stage']} mid-stage, "
        f"{result['kills_after_commit']} right after a commit), {result['total_s']} s in all",
        "",
        f"  {'RUN':<4} {'KILL POINT':<18} {'LANDED':<30} {'INTO STAGE':>10} {'RESUME':>8} {'WALL':>7} {'REUSED':>6}",
    ]
    for r in result["runs"]:
        point = f"{r['target']}+{r['delay_s']}s" if r["target"] else "(none)"
        into = "" if r["seconds_into_stage"] is None else f"{r['seconds_into_stage']:.1f} s"
        resume = "" if r["resume_s"] is None else f"{r['resume_s']:.1f} s"
        lines.append(
            f"  {r['index']:<4} {point:<18} {r['landed']:<30} {into:>10} {resume:>8} {r['wall_s']:>5.1f} s "
            f"{r['reused']:>6}"
        )
    lines += [
        "",
        f"  manifests {result['manifests']}, verified {result['verified']}, torn {result['torn']}, "
        f"recomputed {result['recomputed']}, staging attempts left for gc {result['staging_attempts_left']}",
        f"  resumed from step: {result['resumed_from']}",
        f"  violations: {len(result['violations'])}",
    ]
    lines += [f"    - {v}" for v in result["violations"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = drill(args.kills, args.seed, args.config, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="fewstep-kill-drill-") as tmp:
            result = drill(args.kills, args.seed, args.config, Path(tmp))
    emit(result, args.json, summary(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
