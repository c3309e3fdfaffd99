"""``fewstep promote``: move the served pointer by hand, through the same gates as a run.

    fewstep promote --rollback [--store URI]
    fewstep promote --model REF [--evaluation REF] [--config FILE] [--preset NAME] [--store URI]

``--rollback`` puts the previous champion back (:func:`infra.champions.rollback`): the one below
the served model in the pointer's champion history, by compare-and-swap against the served ref it
read, with the guidance it was promoted with. ``--model`` runs the promotion gate of a pipeline run
(the absolute bar, then champion against challenger at ``serve.steps``) on an evaluation that
scored the model (the newest one, unless ``--evaluation`` names one). Either way the move is
appended to the champion history. Nothing to roll back to, a pointer that moved meanwhile, or a
bad ref is one line on stderr and exit status 2; a refused promotion says why, with status 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.options import PRESET_HELP, STORE_HELP


def promote(
    rollback: bool = typer.Option(False, "--rollback", help="Put the previous champion back on serving/current."),
    model: str | None = typer.Option(None, "--model", help="Promote this generator ref (stage/key) through the gate."),
    evaluation: str | None = typer.Option(
        None, "--evaluation", help="The evaluate ref whose table scores --model (default: the newest that did)."
    ),
    config: Path | None = typer.Option(None, "--config", help="YAML file: its serve section sets steps and the bar."),
    preset: str = typer.Option("default", "--preset", help=PRESET_HELP),
    store: str | None = typer.Option(None, "--store", help=STORE_HELP),
) -> None:
    """Roll the served model back to the previous champion, or promote a model through the gate."""
    from flows.errors import UserError
    from infra.store import SERVING_POINTER, Store

    if rollback == (model is not None):
        raise UserError("say what to do: `fewstep promote --rollback`, or `fewstep promote --model REF` (not both)")
    opened = Store.open(store)
    if rollback:
        from infra.champions import rollback as roll_back

        done = roll_back(opened, SERVING_POINTER)
        scale = f", default guidance {done.guidance:g}" if done.guidance is not None else ""
        quality = f" (FID {done.fid:.4g} when it was promoted)" if done.fid is not None else ""
        typer.echo(f"fewstep: rolled back {SERVING_POINTER}: {done.from_ref} -> {done.to_ref}{quality}{scale}")
        return
    from infra.config import load_config
    from workers.stages.s11_promote import EVALUATE, Bar
    from workers.stages.s11_promote import promote as gate

    serve = load_config(preset, config).serve
    candidate = opened.get_ref(model)  # a ref that is not committed: a StoreError naming it
    if evaluation is None:
        scored = [m for m in opened.list_manifests(EVALUATE) if candidate.ref in m.inputs]
        if not scored:
            raise UserError(
                f"no evaluation in {opened.uri} scored {candidate.ref}; run `fewstep evaluate --model {candidate.ref}` "
                "first, or name one with --evaluation"
            )
        evaluation = scored[-1].ref
    try:
        decision = gate(opened, candidate.ref, evaluation, serve.steps, solver=serve.solver, bar=Bar.of(serve))
    except ValueError as error:  # not a generator, not an evaluate ref: the user's to fix
        raise UserError(str(error)) from None
    if not decision.promoted:
        typer.echo(f"fewstep: {candidate.ref} not promoted: {decision.reason}")
        raise typer.Exit(1)
    typer.echo(
        f"fewstep: promoted {SERVING_POINTER}: {decision.current or '(nothing)'} -> {candidate.ref} — {decision.reason}"
    )
