"""A generator stage is a recipe: its data, its objective, its teacher. This module is the rest.

A training stage (base, reflow, consistency, ddpm) hands :func:`run_generator_stage` a function
that returns its :class:`Recipe`; the shared tail is the same for every stage:

    key (workers.runner) -> fit (workers.train) -> write model, raw, curve -> GeneratorCard

The recipe is prepared only when the stage is built, never when a committed stage is reused, so
loading a teacher or reading a table costs nothing on a re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from infra.cards import GeneratorCard
from infra.config import LoopConfig
from infra.store import Manifest, StageWriter, Store
from models.objectives import Objective
from models.registry import build_model
from workers.heldout import HeldOut, card_fields
from workers.runner import run_stage
from workers.train import BatchAdapter, TrainJob, TrainResult, fit
from workers.warm import WarmStart, seed_checkpoint


@dataclass(frozen=True)
class Recipe:
    """What makes one generator stage its own."""

    dataset: Any  # a ray.data.Dataset of training rows, in ``adapt_batch``'s input format
    adapt_batch: BatchAdapter  # rows -> the objective's batch ({"x_1", "y"} and maybe "x_0")
    model_spec: dict  # the network's architecture (models.registry)
    objective: Objective
    card: Mapping[str, Any]  # the card's own fields: family, latent space, teacher, round, ...
    init_state: dict[str, Tensor] | None = None  # a teacher's weights to start from
    heldout: HeldOut | None = None  # scored at every checkpoint (workers.heldout)


def run_generator_stage(
    store: Store,
    stage: str,
    config: LoopConfig,
    inputs: Sequence[Manifest],
    recipe: Callable[[], Recipe],
    *,
    source: str,
    extra_key: Mapping[str, Any] | None = None,
    warm: WarmStart | None = None,
) -> Manifest:
    """The committed generator of (stage, config, inputs, code), trained from ``recipe()`` if there is none.

    ``source`` is the stage module (``__name__``); ``extra_key``: values beyond the section that
    shape the output (a reflow round's index). ``warm``: start from a parent's weights and EMA for
    its steps (workers.warm); it enters the key only then, so a stage from scratch is keyed as ever."""

    def build(writer: StageWriter, key: str) -> GeneratorCard:
        r = recipe()
        if warm is not None:  # the parent as step 0: the loop resumes from it as from any checkpoint
            seed_checkpoint(store, stage, key, warm, r.objective.extra_modules(), config.seed)
        job = TrainJob(
            store=store,
            stage=stage,
            key=key,
            model_spec=r.model_spec,
            objective=r.objective,
            config=warm.loop_config(config) if warm is not None else config,
            adapt_batch=r.adapt_batch,
            init_state=r.init_state,
            heldout=r.heldout,
        )
        result = fit(job, r.dataset)
        # a card naming the base an adapter goes on (models/lora.py): only the adapter is stored
        write_generator(writer, r.model_spec, result, r.heldout, adapter=r.card.get("adapter_of") is not None)
        return GeneratorCard(
            steps=result.step,
            final_loss=result.final_loss,
            resumed_from=result.resumed_from,
            nodes=tuple(result.nodes),
            parent_ref=warm.parent.ref if warm is not None else None,
            **card_fields(result, r.heldout),
            **r.card,
        )

    keyed = {**(extra_key or {}), **(warm.key if warm is not None else {})}
    return run_stage(store, stage, config, inputs, build, source=source, extra_key=keyed or None)


def write_generator(
    writer: StageWriter, spec: dict, result: TrainResult, heldout: HeldOut | None, adapter: bool = False
) -> None:
    """``model`` (EMA weights, what is sampled), ``raw`` (the trained weights) and ``curve`` (with
    what the curve's held-out loss was measured on, see workers.heldout). An ``adapter`` stage
    writes its adapter alone: ``adapter`` (EMA), ``adapter_raw`` and ``adapter_spec``, the network
    it goes on being its card's ``adapter_of``."""
    if adapter:
        from models.lora import adapter_state

        writer.write_tensors("adapter", adapter_state(result.ema_state))
        writer.write_tensors("adapter_raw", adapter_state(result.model_state))
        writer.write_json("adapter_spec", spec)
    else:
        for name, state in (("model", result.ema_state), ("raw", result.model_state)):
            net = build_model(spec)
            net.load_state_dict(state)
            writer.write_model(name, net, spec)
    description = heldout.description if heldout is not None else None
    writer.write_json("curve", {"curve": result.curve, "resumed_from": result.resumed_from, "heldout": description})
