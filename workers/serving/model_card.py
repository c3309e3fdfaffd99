"""What ``GET /v1/model`` says about the served model: ref, family, default guidance, lineage, evaluation.

Computed once when a model is loaded. JSON-safe throughout: a diverged model's NaN FID must
not turn the endpoint into a 500.
"""

from __future__ import annotations

import math
from typing import Any

from infra.cards import GeneratorCard
from infra.store import Manifest, Store
from workers.evaluation.table import read_rows

LINEAGE_LIMIT = 64  # manifests listed in the lineage, nearest first
EVALUATE = "evaluate"


def strict_json(value: Any) -> Any:
    """NaN and infinities (which Python's JSON parser accepts, and strict JSON does not) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float, str)) and len(str(v)) <= 80}


def lineage(store: Store, manifest: Manifest, limit: int = LINEAGE_LIMIT) -> list[dict[str, Any]]:
    """The manifests this one was built from (inputs, and the VAE it decodes with), nearest first."""
    card = GeneratorCard.from_manifest(manifest)
    seen, queue, out = {manifest.ref}, [*manifest.inputs, card.vae_ref], []
    while queue and len(out) < limit:
        ref = queue.pop(0)
        if not ref or ref in seen:
            continue
        seen.add(ref)
        m = store.get_ref(ref)
        out.append({"ref": m.ref, "stage": m.stage, "created_at": m.created_at, "metrics": scalar_metrics(m.metrics)})
        queue.extend(m.inputs)
    return out


def evaluation_of(store: Store, ref: str) -> dict[str, Any] | None:
    """The rows of the newest evaluate stage that scored ``ref``, and its reference rows."""
    for manifest in reversed(store.list_manifests(EVALUATE)):
        if ref not in manifest.inputs:
            continue
        rows = read_rows(store, manifest)
        mine = [r.to_record() for r in rows if r.stage_key == ref]
        if mine:
            return {
                "ref": manifest.ref,
                "created_at": manifest.created_at,
                "rows": mine,
                "references": [r.to_record() for r in rows if r.is_reference],
            }
    return None


def model_card(store: Store, manifest: Manifest, sampler: str, guidance: float = 1.0) -> dict[str, Any]:
    """The served model as /v1/model shows it; ``sampler`` is what it is served with, ``guidance``
    the scale a request without one is drawn at."""
    card = GeneratorCard.from_manifest(manifest)
    return strict_json(
        {
            "ref": manifest.ref,
            "stage": manifest.stage,
            "digest": manifest.digest,
            "created_at": manifest.created_at,
            "family": card.family,
            "sampler": sampler,
            "guidance": guidance,
            "num_classes": card.num_classes,
            "latent_shape": list(card.latent_shape),
            "parent_ref": card.parent_ref,  # the model it warm-started from (None: trained from scratch)
            "adapter_of": card.adapter_of,  # a LoRA student's base: `adapter: false` in a request draws it
            "metrics": scalar_metrics(manifest.metrics),
            "lineage": lineage(store, manifest),
            "evaluation": evaluation_of(store, manifest.ref),
        }
    )
