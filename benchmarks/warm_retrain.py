"""A retrain on 10% more images, warm against scratch, from one first run (issue 23's measures).

    python benchmarks/warm_retrain.py [--n 12000] [--grow 0.1] [--source shapes|digits]
                                      [--preset P] [--config FILE] [--tiny] [--json]

A folder of ``--n`` images of a built-in set (written as PNG files, so ingest sees a user's
folder) goes through the whole pipeline once (the first run, from scratch, promoted). The store
is then copied, the folder grows by ``--grow``, and the second run goes twice, one store each:
``retrain.mode: warm`` (the default: the VAE kept if it still reconstructs the new images,
base, reflow and consistency warm-started from the served lineage) and ``retrain.mode: scratch``.

Prints the flow's wall time of each run and the ratios to the first run's (issue 23 asks for
warm <= 0.35x), the FID of each challenger with its bootstrap interval at the served step count
(the promotion decision's figures, read from its evaluate table), and the images each run's
stage cards say were decoded (ingest) and encoded (latents). ``--json`` prints one JSON object last.

``--tiny`` (the micro sizes) checks that the script runs: there fixed costs (Ray Train's start-up
per stage, Prefect's task runs) dominate and the ratios say nothing. Measure at full size:

    python benchmarks/warm_retrain.py --source shapes --n 12000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from drills import kit  # noqa: E402
from infra.cards import ImagesCard, LatentsCard  # noqa: E402
from infra.config import load_config  # noqa: E402
from infra.presets import deep_merge  # noqa: E402
from infra.store import Store  # noqa: E402

SOURCES = {"shapes": {"image_size": 32, "channels": 3}, "digits": {"image_size": 16, "channels": 1}}
PRESET = {"shapes": "shapes", "digits": "default"}  # the preset each source is tuned under
# The smallest sizes at which the script runs through: `--tiny` checks that it works, nothing more.
TINY = deep_merge(
    kit.MICRO,
    {"probe": {"enabled": False}, "retrain": {"steps": {"base": 4, "reflow": 2, "consistency": 2}}},
)


def figures(store: Store, result: dict[str, Any], wall_s: float, since: str) -> dict[str, Any]:
    """What one run did: its times, its challenger's FID and interval, the images its cards say it processed."""
    refs, decision = result["refs"], result["promotion"]
    images = ImagesCard.from_manifest(store.get_ref(refs["images"]))
    latents = LatentsCard.from_manifest(store.get_ref(refs["latents"]))
    interval = decision.get("candidate_interval") or (None, None)
    vae = (result.get("retrain") or {}).get("vae") or {}
    return {
        "flow_s": result["seconds"],
        "wall_s": round(wall_s, 1),
        "challenger": refs["consistency"],
        "fid": decision.get("candidate_fid"),
        "fid_corrected": corrected_fid(store, decision),
        "fid_low": interval[0],
        "fid_high": interval[1],
        "steps": decision.get("steps"),
        "promoted": decision.get("promoted"),
        "decoded": images.decoded,
        "reused_images": images.reused,
        "encoded": latents.encoded,
        "reused_latents": latents.reused,
        "vae": vae.get("action", "trained"),
        "warm": (result.get("retrain") or {}).get("warm", {}),
        "stage_s": stage_seconds(store, refs, since),
    }


def corrected_fid(store: Store, decision: dict[str, Any]) -> float | None:
    """The challenger's bias-corrected FID at the served steps: the value its interval is built around
    (the decision's ``candidate_fid`` is the plug-in, biased upwards at a finite n)."""
    from workers.evaluation.table import read_rows, row_at

    if not decision.get("candidate_evaluation"):
        return None
    rows = read_rows(store, store.get_ref(decision["candidate_evaluation"]))
    row = row_at(rows, decision["candidate"], decision["steps"], decision.get("sampler"))
    return None if row is None else row.fid_corrected


def stage_seconds(store: Store, refs: dict[str, str], since: str) -> dict[str, float]:
    """Seconds each stage of the run spent building its output: 0 for one committed before the run
    started at ``since`` (an ISO time; a kept VAE, an unchanged stage)."""
    out: dict[str, float] = {}
    for name, ref in refs.items():
        manifest = store.get_ref(ref)
        built = manifest.created_at >= since
        out[name] = round(float(manifest.metrics.get("seconds") or 0.0), 1) if built else 0.0
    return out


def run(config: dict[str, Any], store_uri: str) -> tuple[dict[str, Any], float, str]:
    """The pipeline's result, its wall seconds, and when it started (UTC, as manifests write it)."""
    from flows.pipeline import pipeline

    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    started = time.perf_counter()
    result = pipeline(config=config, store_uri=store_uri)
    return result, time.perf_counter() - started, since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12000, help="images in the first run (the shapes preset's count)")
    parser.add_argument("--grow", type=float, default=0.1, help="new images in the second run, as a fraction of n")
    parser.add_argument("--source", choices=sorted(SOURCES), default="shapes")
    parser.add_argument("--preset", default=None, help="default: the source's own (shapes; digits: default)")
    parser.add_argument("--config", default=None, help="a YAML config file on top of the preset")
    parser.add_argument("--tiny", action="store_true", help="the micro sizes: checks the script, measures nothing")
    parser.add_argument("--workdir", default=None, help="where the folder and stores go (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fewstep-warm-"))
    folder = work / "photos"
    new = max(1, round(args.grow * args.n))
    kit.builtin_folder(folder, args.source, 0, args.n)
    overrides = {
        **(TINY if args.tiny else {}),
        "ingest": {"source": str(folder), "limit": None, **SOURCES[args.source]},
    }
    preset = "quick" if args.tiny else args.preset or PRESET[args.source]
    cfg = load_config(preset, args.config, overrides)

    def with_mode(mode: str) -> dict[str, Any]:
        return cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"mode": mode})}).model_dump(mode="json")

    from workers.runtime import ensure_ray

    ensure_ray(None)  # Ray's start-up is no run's time
    warm_uri, scratch_uri = str(work / "store-warm"), str(work / "store-scratch")
    first, first_wall, first_since = run(with_mode("warm"), warm_uri)  # nothing served yet: from scratch
    shutil.copytree(warm_uri, scratch_uri)  # the same first store, for the scratch second run
    kit.builtin_folder(folder, args.source, args.n, args.n + new)
    warm, warm_wall, warm_since = run(with_mode("warm"), warm_uri)
    scratch, scratch_wall, scratch_since = run(with_mode("scratch"), scratch_uri)

    runs = {
        "first": figures(Store.open(warm_uri), first, first_wall, first_since),
        "warm": figures(Store.open(warm_uri), warm, warm_wall, warm_since),
        "scratch": figures(Store.open(scratch_uri), scratch, scratch_wall, scratch_since),
    }
    base = runs["first"]["flow_s"]
    result = {
        "n": args.n,
        "new": new,
        "source": args.source,
        "preset": "quick+tiny" if args.tiny else preset,
        "runs": runs,
        "ratio_warm_over_first": round(runs["warm"]["flow_s"] / base, 3),
        "ratio_scratch_over_first": round(runs["scratch"]["flow_s"] / base, 3),
        "warm_fid_within_or_below_scratch_interval": (
            None
            if runs["scratch"]["fid_high"] is None or runs["warm"]["fid_corrected"] is None
            else runs["warm"]["fid_corrected"] <= runs["scratch"]["fid_high"]
        ),
    }

    def fid(r: dict[str, Any]) -> str:
        if r["fid"] is None:
            return "-"
        return (
            f"{r['fid_corrected']:.2f} [{r['fid_low']:.2f}, {r['fid_high']:.2f}] ({r['fid']:.2f})"
            if r["fid_low"] is not None and r["fid_corrected"] is not None
            else f"{r['fid']:.2f}"
        )

    lines = [
        f"warm retrain benchmark: {args.n} {args.source} images, then {new} more ({result['preset']}); work dir {work}",
        f"{'run':<8} {'flow s':>8} {'wall s':>8} {'ratio':>6}  {'FID (interval) at ' + str(runs['first']['steps']) + ' step(s)':<28}"
        f" {'decoded':>8} {'encoded':>8}  vae",
    ]
    for name, r in runs.items():
        lines.append(
            f"{name:<8} {r['flow_s']:>8.1f} {r['wall_s']:>8.1f} {r['flow_s'] / base:>6.2f}  {fid(r):<28} "
            f"{r['decoded']:>8} {r['encoded']:>8}  {r['vae']}"
        )
    stages = list(runs["first"]["stage_s"])
    lines.append("seconds per stage: " + "  ".join(f"{name:>10}" for name in ("run", *stages)))
    for name, r in runs.items():
        lines.append(
            "                   " + "  ".join(f"{v:>10}" for v in (name, *(r["stage_s"].get(s, "-") for s in stages)))
        )
    lines.append(
        f"warm / first = {result['ratio_warm_over_first']:.2f} (issue 23: <= 0.35); "
        f"scratch / first = {result['ratio_scratch_over_first']:.2f}; "
        f"warm FID within or below the scratch interval: {result['warm_fid_within_or_below_scratch_interval']}"
    )
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
