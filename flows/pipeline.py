"""The ``pipeline`` Prefect flow: one task per stage, in order, each a plain call into workers/.

    ingest -> vae -> latents -> features -> base -> guidance_distill (optional, guidance_distill.enabled)
           -> (pairs -> reflow) x rounds -> consistency -> flowmap (optional, flowmap.enabled)
           -> lora (optional, lora.enabled) -> evaluate -> promote
                      latents -> ddpm (optional, ddpm.enabled) -> evaluate

and a probe (``probe.enabled``) right after each generator stage: a few hundred samples per
guidance scale, scored in the features stage's space (hence features first), whose warning
reaches the Prefect UI (a warning log and the markdown artifact ``fewstep-probe-<model>``) and
the command line (a ``WARNING`` line under the stage).

Every stage is already a Ray driver, so the tasks run in the flow's own process (no Ray
task runner); a task receives only its own config section, and what passes between tasks
is a manifest ref ("stage/key"), never tensors. A re-run of the same config finds each
committed stage by its key and returns at once; an interrupted training stage resumes from
its checkpoint in the store. Tasks retry infrastructure failures (a lost Ray actor or node,
a transient S3 error), never bad input.

Guidance: ``pairs.guidance``, ``consistency.guidance`` and ``flowmap.guidance`` left at None mean
"the base model's best guidance"; the flow resolves them right after base (:func:`base_best_guidance`)
and hands each stage its section with the number in it, so the stage key records the scale it used.

Promotion: the candidate is the student (consistency, and the flow-map student, the LoRA adapter and
the guidance-distilled base when they run) with the lowest FID at the served step count in this run's
evaluation (:func:`pick_candidate`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fewstep")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from the ephemeral server

from prefect import flow, get_run_logger, task  # noqa: E402

from flows.artifacts import (  # noqa: E402
    publish_evaluation,
    publish_probe,
    publish_promotion,
    publish_run,
    publish_stage,
)
from infra.cards import GeneratorCard, ProbeCard  # noqa: E402
from infra.champions import finite_or_none, read_history  # noqa: E402
from infra.config import (  # noqa: E402
    ConsistencyConfig,
    DDPMConfig,
    EvaluateConfig,
    FeaturesConfig,
    FlowMapConfig,
    GeneratorConfig,
    GuidanceDistillConfig,
    IngestConfig,
    LatentsConfig,
    LoRAConfig,
    PairsConfig,
    PipelineConfig,
    ProbeConfig,
    ReflowConfig,
    RetrainConfig,
    ServeConfig,
    VAEConfig,
    validate_config,
)
from infra.store import SERVING_POINTER, Manifest, Store  # noqa: E402
from workers.errors import is_transient  # noqa: E402
from workers.guidance import resolve_guidance  # noqa: E402
from workers.runtime import ensure_ray  # noqa: E402
from workers.stages.s01_ingest import run_ingest  # noqa: E402
from workers.stages.s02_vae import run_vae  # noqa: E402
from workers.stages.s03_latents import run_latents  # noqa: E402
from workers.stages.s04_base import run_base  # noqa: E402
from workers.stages.s05_pairs import run_pairs  # noqa: E402
from workers.stages.s06_reflow import run_reflow  # noqa: E402
from workers.stages.s07_consistency import run_consistency  # noqa: E402
from workers.stages.s08_ddpm import run_ddpm  # noqa: E402
from workers.stages.s09_features import run_features  # noqa: E402
from workers.stages.s10_evaluate import run_evaluate  # noqa: E402
from workers.stages.s11_promote import Bar, pick_candidate, promote  # noqa: E402
from workers.stages.s12_probe import probe_best_guidance, run_probe  # noqa: E402, F401 - probe_best_guidance: for flows
from workers.stages.s13_flowmap import run_flowmap  # noqa: E402
from workers.stages.s14_guidance import run_guidance_distill  # noqa: E402
from workers.stages.s15_lora import run_lora  # noqa: E402
from workers.warm import check_vae, kept_features, plan_retrain, warm_start  # noqa: E402

# Backoff for transient infrastructure errors (S3 hiccups, a lost Ray actor or node).
RETRY_DELAYS = [2, 10, 30]
# The base model's best guidance when nothing has measured it: guidance ~2 halves a conditional
# model's FID on the shapes benchmark (issue 20's diagnosis); unlabelled data has nothing to guide.
FALLBACK_GUIDANCE = {True: 2.0, False: 1.0}  # labelled -> scale
PROBE = "probe"  # the stage that measures a model's best guidance cheaply, right after it trains

log = logging.getLogger("fewstep.pipeline")


def retry_only_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry infrastructure failures, never bad input or bad config."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classifying the task's own failure
        return is_transient(error)
    return False


def stage_task(name: str) -> Callable:
    return task(
        name=name,
        task_run_name=name,
        retries=len(RETRY_DELAYS),
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=retry_only_transient,
        log_prints=True,
    )


def check_task(name: str) -> Callable:
    """A short task that reads the store (no Ray stage): two quick retries of a transient failure."""
    return task(
        name=name,
        task_run_name=name,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=retry_only_transient,
    )


def run_and_publish(
    store_uri: str | None,
    ray_address: str | None,
    run: Callable[..., Manifest],
    section: Any,
    input_refs: list[str],
    *extra: Any,
) -> str:
    """The body every stage task shares: attach to Ray, resolve inputs, run, publish, return the ref."""
    ensure_ray(ray_address)
    store = Store.open(store_uri)
    manifest = run(store, section, *[store.get_ref(ref) for ref in input_refs], *extra)
    publish_stage(manifest, store)
    return manifest.ref


@stage_task("ingest")
def ingest_task(store_uri: str | None, section: IngestConfig, ray_address: str | None) -> str:
    return run_and_publish(store_uri, ray_address, run_ingest, section, [])


@stage_task("vae")
def vae_task(store_uri: str | None, section: VAEConfig, ray_address: str | None, images: str) -> str:
    return run_and_publish(store_uri, ray_address, run_vae, section, [images])


@stage_task("latents")
def latents_task(store_uri: str | None, section: LatentsConfig, ray_address: str | None, images: str, vae: str) -> str:
    return run_and_publish(store_uri, ray_address, run_latents, section, [images, vae])


@check_task("retrain-plan")
def retrain_plan_task(store_uri: str | None, section: RetrainConfig) -> dict:
    """What this run builds on (workers.warm.plan_retrain), before any stage: the served lineage's
    refs, or none; a parent that cannot be loaded fails here under ``retrain.mode: warm``."""
    return plan_retrain(Store.open(store_uri), section).as_record()


@check_task("vae-check")
def vae_check_task(
    store_uri: str | None, section: RetrainConfig, vae_section: VAEConfig, vae: str, images: str
) -> dict:
    """Whether the served VAE goes on for these images (workers.warm.check_vae)."""
    store = Store.open(store_uri)
    verdict = check_vae(
        store,
        store.get_ref(vae),
        store.get_ref(images),
        vae_section.keyed(),
        section.vae_tolerance,
        vae_section.measure_images,
    )
    return verdict.as_record()


def warm_and_run(
    store_uri: str | None,
    ray_address: str | None,
    run: Callable[..., Manifest],
    section: Any,
    input_refs: list[str],
    parent: str | None,
    steps: int,
    *extra: Any,
) -> str:
    """:func:`run_and_publish` for a generator stage that may warm-start from ``parent`` (workers.warm)."""
    ensure_ray(ray_address)
    store = Store.open(store_uri)
    inputs = [store.get_ref(ref) for ref in input_refs]
    warm = warm_start(store, store.get_ref(parent) if parent else None, inputs, steps)
    manifest = run(store, section, *inputs, *extra, warm)
    publish_stage(manifest, store)
    return manifest.ref


@stage_task("base")
def base_task(
    store_uri: str | None,
    section: GeneratorConfig,
    ray_address: str | None,
    latents: str,
    parent: str | None = None,
    warm_steps: int = 0,
) -> str:
    return warm_and_run(store_uri, ray_address, run_base, section, [latents], parent, warm_steps)


@stage_task("ddpm")
def ddpm_task(store_uri: str | None, section: DDPMConfig, ray_address: str | None, latents: str) -> str:
    return run_and_publish(store_uri, ray_address, run_ddpm, section, [latents])


@stage_task("pairs")
def pairs_task(
    store_uri: str | None, section: PairsConfig, ray_address: str | None, teacher: str, round_index: int
) -> str:
    return run_and_publish(store_uri, ray_address, run_pairs, section, [teacher], round_index)


@stage_task("reflow")
def reflow_task(
    store_uri: str | None,
    section: ReflowConfig,
    ray_address: str | None,
    teacher: str,
    pairs: str,
    round_index: int,
    parent: str | None = None,
    warm_steps: int = 0,
) -> str:
    return warm_and_run(store_uri, ray_address, run_reflow, section, [teacher, pairs], parent, warm_steps, round_index)


@stage_task("consistency")
def consistency_task(
    store_uri: str | None,
    section: ConsistencyConfig,
    ray_address: str | None,
    teacher: str,
    data: str,
    parent: str | None = None,
    warm_steps: int = 0,
) -> str:
    return warm_and_run(store_uri, ray_address, run_consistency, section, [teacher, data], parent, warm_steps)


@stage_task("flowmap")
def flowmap_task(
    store_uri: str | None, section: FlowMapConfig, ray_address: str | None, teacher: str, data: str
) -> str:
    return run_and_publish(store_uri, ray_address, run_flowmap, section, [teacher, data])


@stage_task("guidance_distill")
def guidance_distill_task(
    store_uri: str | None, section: GuidanceDistillConfig, ray_address: str | None, teacher: str, data: str
) -> str:
    return run_and_publish(store_uri, ray_address, run_guidance_distill, section, [teacher, data])


@stage_task("lora")
def lora_task(store_uri: str | None, section: LoRAConfig, ray_address: str | None, base: str, data: str) -> str:
    return run_and_publish(store_uri, ray_address, run_lora, section, [base, data])


@stage_task("features")
def features_task(store_uri: str | None, section: FeaturesConfig, ray_address: str | None, images: str) -> str:
    return run_and_publish(store_uri, ray_address, run_features, section, [images])


@stage_task("evaluate")
def evaluate_task(
    store_uri: str | None,
    section: EvaluateConfig,
    ray_address: str | None,
    generators: list[str],
    images: str,
    vae: str,
    features: str | None,
) -> str:
    ensure_ray(ray_address)
    store = Store.open(store_uri)
    manifest = run_evaluate(
        store,
        section,
        [store.get_ref(ref) for ref in generators],
        store.get_ref(images),
        store.get_ref(vae),
        store.get_ref(features) if features else None,
    )
    publish_evaluation(store, manifest)
    return manifest.ref


@stage_task("probe")
def probe_task(
    store_uri: str | None,
    section: ProbeConfig,
    ray_address: str | None,
    model: str,
    images: str,
    vae: str,
    features: str | None,
    extractor: str | None,
    extractor_kind: str,
    label: str,
) -> str:
    """Probe one generator; its verdict goes to the log (a warning when it has not learned) and an artifact."""
    ensure_ray(ray_address)
    store = Store.open(store_uri)
    manifest = run_probe(
        store,
        section,
        store.get_ref(model),
        store.get_ref(images),
        store.get_ref(vae),
        store.get_ref(features) if features else None,
        extractor,
        extractor_kind,
    )
    card = ProbeCard.from_manifest(manifest)
    publish_probe(card, manifest.ref, label)
    if card.learned:
        get_run_logger().info("probe of %s: learned (best guidance %g)", model, card.best_guidance)
    else:
        get_run_logger().warning("probe: %s", card.verdict)
    return manifest.ref


@check_task("promote")
def promote_task(
    store_uri: str | None, section: ServeConfig, candidate: str, evaluation: str, run_id: str | None = None
) -> dict:
    """Champion against challenger; the decision and its figures go to the ``fewstep-promotion`` artifact."""
    decision = promote(
        Store.open(store_uri),
        candidate,
        evaluation,
        section.steps,
        solver=section.solver,
        bar=Bar.of(section),
        run_id=run_id,
    )
    if decision.below_bar:
        get_run_logger().warning("promotion: %s", decision.reason)
    else:
        get_run_logger().info("promotion: %s", decision.reason)
    publish_promotion(decision.as_dict())
    return decision.as_dict()


def decision_record(decision: dict) -> dict:
    """The decision as the run record keeps it: plain JSON, a NaN FID as None."""
    return {
        k: [finite_or_none(x) for x in v] if isinstance(v, (list, tuple)) else finite_or_none(v)
        for k, v in decision.items()
    }


@flow(name="pipeline", log_prints=True)
def pipeline(
    config: dict[str, Any] | PipelineConfig | None = None, store_uri: str | None = None, ray_address: str | None = None
) -> dict[str, Any]:
    """ingest -> vae -> latents -> base -> (pairs -> reflow) x k -> consistency -> features -> evaluate -> promote.

    ``config``: a PipelineConfig the caller validated (``fewstep run``), or the plain data of one
    (a scheduled run's parameters), validated and preflighted here; either way, validated once."""
    cfg = config if isinstance(config, PipelineConfig) else validate_config(config or {}, "the flow's config parameter")
    started = time.perf_counter()
    refs: dict[str, str] = {}
    retrain: dict[str, Any] = {}  # what this run built on (workers.warm), for the run record
    store = Store.open(store_uri)
    run_id = current_run_id()
    # A running run is a root for `fewstep gc` (its heartbeat says it is alive) until it finishes.
    store.begin_run(run_id, {"flow": "pipeline"})
    try:
        with store.keep_alive(run_id):
            decision = run_stages(cfg, store, store_uri, ray_address, refs, run_id, retrain)
    except BaseException:
        store.finish_run(run_id, refs, {"seconds": round(time.perf_counter() - started, 1)}, status="failed")
        raise
    seconds = round(time.perf_counter() - started, 1)
    store.finish_run(run_id, refs, {"seconds": seconds, "promotion": decision_record(decision), "retrain": retrain})
    served = store.get_pointer(SERVING_POINTER)
    publish_run(store, refs, seconds, decision, served, read_history(store, SERVING_POINTER))
    get_run_logger().info("pipeline finished in %.1fs: %s", seconds, refs)
    return {
        "refs": refs,
        "seconds": seconds,
        "promotion": decision,
        "run_id": run_id,
        "served": served,
        "retrain": retrain,
    }


def run_stages(
    cfg: PipelineConfig,
    store: Store,
    store_uri: str | None,
    ray_address: str | None,
    refs: dict[str, str],
    run_id: str | None = None,
    retrain: dict[str, Any] | None = None,
) -> dict:
    """Every stage in order, filling ``refs`` as they commit; returns the promotion decision.
    ``store`` is the flow's own (each task opens ``store_uri`` itself, as a task may run elsewhere);
    ``run_id`` goes into the champion history when this run's candidate is promoted; ``retrain``
    receives what the run built on (the plan, the VAE's verdict, each warm start's parent)."""
    retrain = {} if retrain is None else retrain
    plan = retrain_plan_task(store_uri, cfg.retrain)  # before any stage: a bad parent fails here
    retrain.update(plan=plan, vae=None)
    parents: dict[str, str] = dict(plan["parents"])
    refs["images"] = ingest_task(store_uri, cfg.ingest, ray_address)
    if plan["vae"] is not None:
        verdict = retrain["vae"] = vae_check_task(store_uri, cfg.retrain, cfg.vae, plan["vae"], refs["images"])
        if verdict["action"] == "keep":
            refs["vae"] = verdict["vae_ref"]
        elif verdict["action"] == "retrain":
            parents = {}
            get_run_logger().warning(
                "retrain: the VAE changes (%s), so this run retrains every model from scratch", verdict["reason"]
            )
    if "vae" not in refs:
        refs["vae"] = vae_task(store_uri, cfg.vae, ray_address, refs["images"])

    def warm(stage: str, name: str) -> dict[str, Any]:
        """The parent and warm steps of generator ``name`` (its section ``stage``), as task arguments."""
        return {"parent": parents.get(name), "warm_steps": cfg.retrain.steps_for(stage, getattr(cfg, stage).steps)}

    refs["latents"] = latents_task(store_uri, cfg.latents, ray_address, refs["images"], refs["vae"])
    features = None
    if cfg.evaluate.extractor is None:  # a user-supplied extractor replaces the learnt feature space
        kept = kept_features(store, cfg.features, plan, retrain.get("vae"), bool(parents))
        if kept is not None:  # one feature space across the lineage: its weekly FIDs compare, and no retraining
            get_run_logger().info("retrain: the served lineage's feature network %s scores this run too", kept)
        features = refs["features"] = kept or features_task(store_uri, cfg.features, ray_address, refs["images"])

    def probe(name: str, model: str) -> None:
        """The cheap check after a generator stage: ``refs["probe_<name>"]``."""
        if not cfg.probe.enabled:
            return
        label = name.replace("_", "-")
        refs[f"probe_{name}"] = probe_task.with_options(name=f"probe-{label}", task_run_name=f"probe-{label}")(
            store_uri,
            cfg.probe,
            ray_address,
            model,
            refs["images"],
            refs["vae"],
            features,
            cfg.evaluate.extractor,
            cfg.evaluate.extractor_kind,
            label,
        )

    refs["base"] = teacher = base_task(store_uri, cfg.base, ray_address, refs["latents"], **warm("base", "base"))
    probe("base", refs["base"])
    if cfg.guidance_distill.enabled:  # classifier-free guidance in one pass: a flow model, and a teacher
        refs["guidance_distill"] = guidance_distill_task(
            store_uri, cfg.guidance_distill, ray_address, refs["base"], refs["latents"]
        )
        probe("guidance_distill", refs["guidance_distill"])
    pairs_cfg, consistency_cfg = resolved_guidance(cfg, store, refs["base"])
    distil_data = refs["latents"]
    for k in range(1, cfg.reflow.rounds + 1):
        pairs = pairs_task.with_options(name=f"pairs-{k}", task_run_name=f"pairs-{k}")(
            store_uri, pairs_cfg, ray_address, teacher, k
        )
        teacher = reflow_task.with_options(name=f"reflow-{k}", task_run_name=f"reflow-{k}")(
            store_uri, cfg.reflow, ray_address, teacher, pairs, k, **warm("reflow", f"reflow_{k}")
        )
        refs[f"pairs_{k}"], refs[f"reflow_{k}"] = pairs, teacher
        probe(f"reflow_{k}", teacher)
        distil_data = pairs

    def distillation_inputs(section: ConsistencyConfig | FlowMapConfig) -> tuple[str, str]:
        """(teacher, data) a student's section names: the last reflow round (base without rounds) and
        its pairs, the base model or its guidance-distilled network, and the latents."""
        chosen = {"base": refs["base"], "guided": refs.get("guidance_distill"), "last_reflow": teacher}
        return (
            chosen[section.teacher],
            refs["latents"] if section.data == "latents" else distil_data,
        )

    refs["consistency"] = consistency_task(
        store_uri,
        consistency_cfg,
        ray_address,
        *distillation_inputs(cfg.consistency),
        **warm("consistency", "consistency"),
    )
    probe("consistency", refs["consistency"])
    students = [refs["consistency"]]
    if cfg.flowmap.enabled:
        flowmap_cfg = resolved_flowmap_guidance(cfg, store, refs["base"])
        refs["flowmap"] = flowmap_task(store_uri, flowmap_cfg, ray_address, *distillation_inputs(cfg.flowmap))
        probe("flowmap", refs["flowmap"])
        students.append(refs["flowmap"])
    if cfg.lora.enabled:  # LCM-LoRA: a consistency student stored as an adapter on the frozen base
        lora_cfg = with_resolved_guidance(cfg.lora, cfg, store, refs["base"])
        refs["lora"] = lora_task(store_uri, lora_cfg, ray_address, refs["base"], refs["latents"])
        probe("lora", refs["lora"])
        students.append(refs["lora"])
    if "guidance_distill" in refs:  # a flow model, put to the gate with the students at the served steps
        students.append(refs["guidance_distill"])
    if cfg.ddpm.enabled:  # the diffusion baseline: evaluated beside the others, never the promotion candidate
        refs["ddpm"] = ddpm_task(store_uri, cfg.ddpm, ray_address, refs["latents"])
        probe("ddpm", refs["ddpm"])
    generators = [refs["base"]] + [refs[f"reflow_{k}"] for k in range(1, cfg.reflow.rounds + 1)] + students
    # Which models warm-started, and from what (their cards say it: a stage may have gone from scratch).
    names = ["base", *[f"reflow_{k}" for k in range(1, cfg.reflow.rounds + 1)], "consistency"]
    retrain["warm"] = {
        name: parent
        for name in names
        if (parent := GeneratorCard.from_manifest(store.get_ref(refs[name])).parent_ref) is not None
    }
    if "ddpm" in refs:
        generators.append(refs["ddpm"])
    # The champion is scored beside the challenger, in one evaluation: the same test images, the same
    # seeds, so the promotion gate reads the paired bootstrap interval of their FID difference.
    defender = served_on_same_data(store, refs["vae"])
    if defender is not None and defender not in generators:
        generators.append(defender)
    elif defender is None and (served := store.get_pointer(SERVING_POINTER)) is not None:
        log.warning(
            "promotion: the served %s cannot be scored beside the candidate (it decodes through another VAE "
            "than this run's %s, or is gone); the gate compares it through an earlier evaluation that measured "
            "both alike, if any",
            served,
            refs["vae"],
        )
    refs["evaluate"] = evaluate_task(
        store_uri, cfg.evaluate, ray_address, generators, refs["images"], refs["vae"], features
    )
    candidate = pick_candidate(store, students, refs["evaluate"], cfg.serve.steps, cfg.serve.solver)
    return promote_task(store_uri, cfg.serve, candidate, refs["evaluate"], run_id)


def base_best_guidance(store: Store, base_ref: str, cfg: PipelineConfig) -> float:
    """The base model's best guidance scale, as cheaply as it is known when base has just trained.

    A committed ``probe`` manifest of ``base_ref`` that records ``best_guidance`` gives it; without
    one, 2.0 for labelled data and 1.0 for unlabelled (:data:`FALLBACK_GUIDANCE`), said in a log line."""
    for probe in reversed(store.list_manifests(PROBE)):
        best = probe.metrics.get("best_guidance")
        if base_ref in probe.inputs and isinstance(best, (int, float)) and math.isfinite(best):
            log.info("guidance: the base model's best is %g (probe %s)", best, probe.ref)
            return float(best)
    labelled = GeneratorCard.from_manifest(store.get_ref(base_ref)).num_classes > 0
    fallback = FALLBACK_GUIDANCE[labelled]
    log.warning(
        "guidance: no probe has measured %s's best guidance; using %g (%s data). Set pairs.guidance and "
        "consistency.guidance to choose another",
        base_ref,
        fallback,
        "labelled" if labelled else "unlabelled",
    )
    return fallback


def resolved_guidance(cfg: PipelineConfig, store: Store, base_ref: str) -> tuple[PairsConfig, ConsistencyConfig]:
    """The pairs and consistency sections with their guidance a number: the config's, or (None)
    the base model's best. The best is looked up only when a section leaves it to the flow."""
    pairs, consistency = cfg.pairs, cfg.consistency
    if pairs.guidance is not None and consistency.guidance is not None:
        return pairs, consistency
    best = base_best_guidance(store, base_ref, cfg)
    return (
        pairs.model_copy(update={"guidance": resolve_guidance(pairs.guidance, best)}),
        consistency.model_copy(update={"guidance": resolve_guidance(consistency.guidance, best)}),
    )


def resolved_flowmap_guidance(cfg: PipelineConfig, store: Store, base_ref: str) -> FlowMapConfig:
    """The flowmap section with its guidance a number: 1 when guidance is applied at sampling, else
    the config's, or (None) the base model's best, as for consistency."""
    if cfg.flowmap.guidance_mode == "sampling":
        return cfg.flowmap.model_copy(update={"guidance": 1.0})
    return with_resolved_guidance(cfg.flowmap, cfg, store, base_ref)


def with_resolved_guidance(section: Any, cfg: PipelineConfig, store: Store, base_ref: str) -> Any:
    """A student's section (flowmap, lora) with its guidance a number: the config's, or (None) the base
    model's best, looked up only then."""
    if section.guidance is not None:
        return section
    return section.model_copy(update={"guidance": resolve_guidance(None, base_best_guidance(store, base_ref, cfg))})


def served_on_same_data(store: Store, vae_ref: str) -> str | None:
    """The served model, if it decodes through this run's VAE (so one evaluation can score both)."""
    ref = store.get_pointer(SERVING_POINTER)
    if ref is None:
        return None
    served = store.get(*ref.split("/", 1))
    if served is None or not GeneratorCard.is_generator(served):
        return None
    return ref if GeneratorCard.from_manifest(served).vae_ref == vae_ref else None


def current_run_id() -> str:
    """The Prefect flow run's id: the run record in the store is named after it."""
    from prefect.context import get_run_context

    return str(get_run_context().flow_run.id)
