"""The ``pipeline`` Prefect flow: one task per stage, in order, each a plain call into workers/.

Every stage is already a Ray driver, so the tasks run in the flow's own process (no Ray
task runner); what passes between tasks is a manifest ref ("stage/key"), never tensors.
A re-run of the same config finds each committed stage by its key and returns at once;
an interrupted training stage resumes from its checkpoint in the store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fewstep")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral server

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from infra.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from infra.store import SERVING_POINTER, Manifest, Store  # noqa: E402

# Backoff for transient infrastructure errors (S3 hiccups, a lost Ray actor or node).
RETRY_DELAYS = [2, 10, 30]


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry infrastructure failures, never bad input or bad config."""
    from workers.errors import is_transient

    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classifying the task's own failure
        return is_transient(error)
    return False


def stage_task(name: str) -> Callable:
    return task(name=name, task_run_name=name, retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
                retry_condition_fn=retry_only_transient, log_prints=True)


def open_store(store_uri: str | None) -> Store:
    return Store.open(store_uri)


def connect(ray_address: str | None) -> None:
    from workers.runtime import ensure_ray

    ensure_ray(ray_address)


def publish_stage(manifest: Manifest) -> None:
    """A small metrics table per stage, under a stable artifact key."""
    rows = [{"metric": k, "value": str(v)} for k, v in sorted(manifest.metrics.items())]
    create_table_artifact(key=f"fewstep-{manifest.stage}-metrics", table=rows,
                          description=f"{manifest.ref} — metrics of the `{manifest.stage}` stage")


def run_and_publish(store_uri: str | None, ray_address: str | None, run: Callable[..., Manifest],
                    section: Any, input_refs: list[str], *extra: Any) -> str:
    """The body every stage task shares: attach to Ray, resolve inputs, run, publish, return the ref."""
    connect(ray_address)
    store = open_store(store_uri)
    manifest = run(store, section, *[store.get_ref(ref) for ref in input_refs], *extra)
    publish_stage(manifest)
    return manifest.ref


@stage_task("ingest")
def ingest_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None) -> str:
    from workers.ingest import run_ingest

    return run_and_publish(store_uri, ray_address, run_ingest, config.ingest, [])


@stage_task("vae")
def vae_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None, images_ref: str) -> str:
    from workers.vae_stage import run_vae

    return run_and_publish(store_uri, ray_address, run_vae, config.vae, [images_ref])


@stage_task("latents")
def latents_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None,
                 images_ref: str, vae_ref: str) -> str:
    from workers.latents import run_latents

    return run_and_publish(store_uri, ray_address, run_latents, config.latents, [images_ref, vae_ref])


@stage_task("base")
def base_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None, latents_ref: str) -> str:
    from workers.generative import run_base

    return run_and_publish(store_uri, ray_address, run_base, config.base, [latents_ref])


@stage_task("reflow-pairs")
def pairs_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None,
               teacher_ref: str, round_index: int) -> str:
    from workers.generative import run_pairs

    return run_and_publish(store_uri, ray_address, run_pairs, config.reflow, [teacher_ref], round_index)


@stage_task("reflow")
def reflow_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None,
                teacher_ref: str, pairs_ref: str, round_index: int) -> str:
    from workers.generative import run_reflow

    return run_and_publish(store_uri, ray_address, run_reflow, config.reflow, [teacher_ref, pairs_ref], round_index)


@stage_task("consistency")
def consistency_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None,
                     teacher_ref: str, data_ref: str) -> str:
    from workers.generative import run_consistency

    return run_and_publish(store_uri, ray_address, run_consistency, config.consistency, [teacher_ref, data_ref])


@stage_task("classifier")
def classifier_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None, images_ref: str) -> str | None:
    from workers.classifier_stage import run_classifier

    if config.evaluate.extractor is not None:
        return None  # a user-supplied extractor replaces the classifier's features
    connect(ray_address)
    store = open_store(store_uri)
    manifest = run_classifier(store, config.evaluate, store.get_ref(images_ref))
    publish_stage(manifest)
    return manifest.ref


@stage_task("evaluate")
def evaluate_task(store_uri: str | None, config: PipelineConfig, ray_address: str | None, generator_refs: list[str],
                  images_ref: str, vae_ref: str, classifier_ref: str | None) -> str:
    from workers.evaluate import evaluation_rows, report_markdown, run_evaluate

    connect(ray_address)
    store = open_store(store_uri)
    manifest = run_evaluate(store, config.evaluate, [store.get_ref(ref) for ref in generator_refs],
                            store.get_ref(images_ref), store.get_ref(vae_ref),
                            store.get_ref(classifier_ref) if classifier_ref else None)
    rows = evaluation_rows(store, manifest)
    create_table_artifact(key="fewstep-fid-vs-steps", table=[stringify(row) for row in rows],
                          description=f"{manifest.ref} — FID, precision, recall and class accuracy against steps")
    create_markdown_artifact(key="fewstep-evaluation-report", markdown=report_markdown(store, manifest),
                             description=f"{manifest.ref} — evaluation report (plot and sample grids in the store)")
    return manifest.ref


@task(name="promote", task_run_name="promote", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_only_transient)
def promote_task(store_uri: str | None, config: PipelineConfig, candidate_ref: str, evaluate_ref: str) -> dict:
    from flows.promote import promote

    logger = get_run_logger()
    decision = promote(open_store(store_uri), candidate_ref, evaluate_ref, config.serve.steps,
                       config.serve.promote_tolerance, solver=config.serve.solver)
    logger.info("promotion: %s", decision.reason)
    return {"promoted": decision.promoted, "candidate": decision.candidate, "current": decision.current,
            "reason": decision.reason, "candidate_fid": decision.candidate_fid, "current_fid": decision.current_fid}


def stringify(row: dict[str, Any]) -> dict[str, Any]:
    """Prefect table artifacts want plain cells; floats keep 4 significant digits."""
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}


@flow(name="pipeline", log_prints=True)
def pipeline(config: dict[str, Any] | None = None, store_uri: str | None = None,
             ray_address: str | None = None) -> dict[str, Any]:
    """ingest -> vae -> latents -> base -> (reflow pairs -> reflow) x k -> consistency -> evaluate -> promote."""
    logger = get_run_logger()
    cfg = PipelineConfig.model_validate(config or {})
    started = time.perf_counter()
    refs: dict[str, str] = {}

    refs["images"] = ingest_task(store_uri, cfg, ray_address)
    check_evaluable(open_store(store_uri).get_ref(refs["images"]), cfg)
    refs["vae"] = vae_task(store_uri, cfg, ray_address, refs["images"])
    refs["latents"] = latents_task(store_uri, cfg, ray_address, refs["images"], refs["vae"])
    refs["base"] = teacher = base_task(store_uri, cfg, ray_address, refs["latents"])
    distil_data = refs["latents"]
    for round_index in range(1, cfg.reflow.rounds + 1):
        pairs = pairs_task.with_options(name=f"reflow-pairs-{round_index}", task_run_name=f"reflow-pairs-{round_index}")(
            store_uri, cfg, ray_address, teacher, round_index)
        teacher = reflow_task.with_options(name=f"reflow-{round_index}", task_run_name=f"reflow-{round_index}")(
            store_uri, cfg, ray_address, teacher, pairs, round_index)
        refs[f"pairs_{round_index}"], refs[f"reflow_{round_index}"] = pairs, teacher
        distil_data = pairs
    if cfg.consistency.data == "latents":
        distil_data = refs["latents"]
    refs["consistency"] = consistency_task(store_uri, cfg, ray_address, teacher, distil_data)
    generators = [refs["base"]] + [refs[f"reflow_{k}"] for k in range(1, cfg.reflow.rounds + 1)] + [refs["consistency"]]
    defender = served_on_same_data(open_store(store_uri), refs["vae"])
    if defender is not None and defender not in generators:
        generators.append(defender)  # scored beside the candidate, so the promotion gate compares like with like
    classifier = classifier_task(store_uri, cfg, ray_address, refs["images"])
    if classifier:
        refs["classifier"] = classifier
    refs["evaluate"] = evaluate_task(store_uri, cfg, ray_address, generators, refs["images"], refs["vae"], classifier)
    decision = promote_task(store_uri, cfg, refs["consistency"], refs["evaluate"])

    summary = {"refs": refs, "seconds": round(time.perf_counter() - started, 1), "promotion": decision}
    run_id = str(get_run_context_id())
    open_store(store_uri).record_run(run_id, refs, {"seconds": summary["seconds"]})
    summary["run_id"] = run_id
    rows = [{"stage": name, "ref": ref} for name, ref in refs.items()]
    served = open_store(store_uri).get_pointer(SERVING_POINTER)
    rows.append({"stage": "served", "ref": served or "(none)"})
    create_table_artifact(key="fewstep-run-summary", table=rows, description="Stages of this run and their refs")
    create_markdown_artifact(key="fewstep-run-report", markdown=run_report(refs, summary["seconds"], decision, served),
                             description="fewstep run summary")
    logger.info("pipeline finished in %.1fs: %s", summary["seconds"], refs)
    return summary


def check_evaluable(images: Manifest, cfg: PipelineConfig) -> None:
    """Unlabeled data has no classifier to measure FID with: say so before hours of training."""
    if int(images.metrics.get("num_classes", 0)) == 0 and cfg.evaluate.extractor is None:
        raise ConfigError(f"{images.ref} has no labels, so fewstep cannot train its default FID feature "
                          "extractor; set evaluate.extractor to a local TorchScript or Inception-v3 file")


def served_on_same_data(store: Store, vae_ref: str) -> str | None:
    """The served model, if it decodes through this run's VAE (so one evaluation can score both)."""
    ref = store.get_pointer(SERVING_POINTER)
    if ref is None:
        return None
    served = store.get(*ref.split("/", 1))
    return ref if served is not None and served.metrics.get("vae_ref") == vae_ref else None


def get_run_context_id() -> str:
    """The Prefect flow run's id: the run record in the store is named after it."""
    from prefect.context import get_run_context

    return str(get_run_context().flow_run.id)


def run_report(refs: dict[str, str], seconds: float, decision: dict, served: str | None) -> str:
    lines = ["# fewstep run", "", f"Finished in {seconds:.1f} s.", "",
             f"**Served model:** `{served or '(none)'}` — promotion: {decision['reason']}", "",
             "| stage | ref |", "|---|---|"]
    lines += [f"| {name} | `{ref}` |" for name, ref in refs.items()]
    lines += ["", "The FID-vs-steps table and the evaluation report are the artifacts "
              "`fewstep-fid-vs-steps` and `fewstep-evaluation-report`."]
    return "\n".join(lines) + "\n"


def run_pipeline_cli(config: Path | None, preset: str, store: str | None, ray_address: str | None, serve: bool) -> dict:
    """What ``fewstep run`` does: validate everything up front, then run the flow."""
    cfg = load_config(preset, config)
    open_store(store)  # a bad store URI fails here, before any work
    summary = pipeline(config=cfg.model_dump(mode="json"), store_uri=store, ray_address=ray_address)
    print(f"fewstep: pipeline finished in {summary['seconds']} s")
    for name, ref in summary["refs"].items():
        print(f"  {name:14s} {ref}")
    print(f"  promotion: {summary['promotion']['reason']}")
    if serve:
        from flows.cli_serve import serve_foreground

        ref = open_store(store).get_pointer(SERVING_POINTER)
        if ref is None:
            raise ConfigError("--serve: no model is promoted in this store; see the promotion line above")
        serve_foreground(open_store(store).uri, cfg.serve, ref, pinned=False, ray_address=ray_address)
    return summary
