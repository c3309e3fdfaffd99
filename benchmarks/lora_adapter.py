"""An LCM-LoRA adapter measured: its size, one replica's memory for student and base, its portability.

    python benchmarks/lora_adapter.py --store STORE --lora lora/KEY [--preset shapes] [--config FILE]
                                      [--tune-steps 1000] [--json]

Reads a store where a pipeline run trained a ``lora`` stage (and a full ``consistency`` student on
the same base, for the memory comparison), then:

1. **size**: the adapter's stored bytes and parameters against its base model's.
2. **memory**: the weights one replica holds to answer both the LoRA student and the base (one
   network, the adapter switched per request: workers.serving.swap) against two full models (the
   base and the consistency student), each loaded in a fresh process, without sampling: the bytes
   of their distinct weight tensors, and the resident memory the load added (each VAE included).
3. **portability**: the base fine-tuned ``--tune-steps`` more steps (a warm start of the base stage
   from it on its own latents, as a retrain's warm start is), the adapter applied unchanged to the
   fine-tuned base, and one evaluation (the evaluate stage's, with intervals) of the adapter on its
   own base, the adapter on the fine-tuned base, and the fine-tuned base alone with Euler at the
   same step counts: is the adapter still a few-step student on a base it was not trained on?

``--json`` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from infra.cards import GeneratorCard  # noqa: E402
from infra.config import load_config  # noqa: E402
from infra.store import Manifest, Store  # noqa: E402

STEPS = (1, 2, 4)


# --------------------------------------------------------------------------- 1. size


def size(store: Store, lora: Manifest, base: Manifest) -> dict[str, Any]:
    from models.lora import adapter_state

    adapter = store.read_tensors(lora, "adapter")
    base_state = store.load_model(base, "model").state_dict()
    params = sum(v.numel() for v in adapter_state(adapter).values())
    base_params = sum(v.numel() for v in base_state.values())
    return {
        "adapter_bytes": lora.files["adapter"].size,
        "base_bytes": base.files["model"].size,
        "bytes_fraction": round(lora.files["adapter"].size / base.files["model"].size, 4),
        "adapter_params": params,
        "base_params": base_params,
        "params_fraction": round(params / base_params, 4),
    }


# --------------------------------------------------------------------------- 2. memory

MEMORY_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from infra.store import Store
from workers.generator import Generator
from workers.serving.swap import adapter_views

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

store = Store.open({store!r})
before = rss()  # everything imported: the two cases differ in what they load, nothing else
if {mode!r} == "adapter":  # as a replica serves it: one network, the adapter switched per request
    generators = adapter_views(store, Generator.load(store, store.get_ref({lora!r})))
    nets = [g.net for g in generators]
else:  # two replicas' worth: the base and the full consistency student, each its own network
    generators = [Generator.load(store, store.get_ref(ref)) for ref in {full!r}]
    nets = [g.net for g in generators]
after = rss()
unique = {{t.data_ptr(): t for n in nets for t in n.state_dict().values()}}  # shared tensors once
print(json.dumps({{"weight_bytes": sum(t.numel() * t.element_size() for t in unique.values()), "rss_added": after - before}}))
"""


def memory(store_uri: str, lora: Manifest, base: Manifest, student: Manifest | None) -> dict[str, Any]:
    """Weights and resident memory of one replica's models, each case in a fresh process."""
    root = str(Path(__file__).resolve().parents[1])
    cases = {"adapter": [], "two_full": [base.ref, student.ref] if student is not None else None}
    out: dict[str, Any] = {}
    for mode, full in cases.items():
        if full is None:
            out[mode] = None
            continue
        code = MEMORY_CHILD.format(root=root, store=store_uri, mode=mode, lora=lora.ref, full=full)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    if out["two_full"]:
        out["weights_ratio"] = round(out["adapter"]["weight_bytes"] / out["two_full"]["weight_bytes"], 4)
    return out


# --------------------------------------------------------------------------- 3. portability


def port(store: Store, lora: Manifest, tuned: Manifest) -> Manifest:
    """The adapter of ``lora``, unchanged, committed as an adapter on ``tuned``."""
    key = hashlib.sha256(f"{lora.ref} on {tuned.ref}".encode()).hexdigest()[:16]
    existing = store.get("lora", key)
    if existing is not None:
        return existing
    card = GeneratorCard.from_manifest(lora)
    fields = {**card.to_metrics(), "adapter_of": tuned.ref, "teacher_ref": tuned.ref, "steps": 0}
    with store.begin("lora", key, config={"ported": lora.ref, "onto": tuned.ref}, inputs=[tuned]) as writer:
        for name in ("adapter", "adapter_raw"):
            writer.write_tensors(name, store.read_tensors(lora, name))
        writer.write_json("adapter_spec", store.read_json(lora, "adapter_spec"))
        return writer.commit(metrics=GeneratorCard.from_metrics(fields, f"lora/{key}").to_metrics())


def portability(store: Store, cfg, lora: Manifest, base: Manifest, tune_steps: int) -> dict[str, Any]:
    from workers.evaluation.table import FLOOR, read_rows, reference_row
    from workers.stages.s04_base import run_base
    from workers.stages.s10_evaluate import run_evaluate
    from workers.warm import load_warm_start

    latents = store.get_ref(base.inputs[0])
    tuned = run_base(store, cfg.base, latents, warm=load_warm_start(store, base, tune_steps))
    ported = port(store, lora, tuned)
    w = GeneratorCard.from_manifest(lora).guidance
    evaluate = cfg.evaluate.model_copy(
        update={"flow_steps": STEPS, "flow_solvers": ("euler",), "consistency_steps": STEPS, "guidance": (w,)}
    )
    vae = store.get_ref(GeneratorCard.from_manifest(base).vae_ref)
    images = store.get_ref(latents.inputs[0])
    features = next((store.get_ref(r) for r in _features_refs(store, images)), None)
    evaluation = run_evaluate(store, evaluate, [lora, ported, tuned], images, vae, features)
    rows = read_rows(store, evaluation)
    names = {
        lora.ref: "adapter on its base",
        ported.ref: "adapter on the fine-tuned base",
        tuned.ref: "fine-tuned base, Euler",
    }
    table = [
        {
            "model": names[r.stage_key],
            "ref": r.stage_key,
            "steps": r.steps,
            "fid": r.fid,
            "fid_low": r.fid_low,
            "fid_high": r.fid_high,
            "class_accuracy": r.class_accuracy,
        }
        for r in rows
        if r.stage_key in names
    ]
    floor = reference_row(rows, FLOOR)
    return {
        "tuned": tuned.ref,
        "ported": ported.ref,
        "evaluation": evaluation.ref,
        "floor": floor.fid if floor else None,
        "rows": table,
    }


def _features_refs(store: Store, images: Manifest) -> list[str]:
    return [m.ref for m in reversed(store.list_manifests("features")) if images.ref in m.inputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--lora", required=True, help="a lora stage's ref (lora/KEY)")
    parser.add_argument("--student", default=None, help="the full consistency student to compare memory with")
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--config", default=None)
    parser.add_argument("--tune-steps", type=int, default=1000)
    parser.add_argument("--skip-portability", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    store = Store.open(args.store)
    lora = store.get_ref(args.lora)
    base = store.get_ref(GeneratorCard.from_manifest(lora).adapter_of)
    student = store.get_ref(args.student) if args.student else None
    cfg = load_config(args.preset, args.config)
    result: dict[str, Any] = {"lora": lora.ref, "base": base.ref, "size": size(store, lora, base)}
    result["memory"] = memory(args.store, lora, base, student)
    if not args.skip_portability:
        from workers.runtime import ensure_ray

        ensure_ray(None)
        result["portability"] = portability(store, cfg, lora, base, args.tune_steps)

    s, m = result["size"], result["memory"]
    lines = [
        f"adapter {lora.ref} on {base.ref}",
        f"size: adapter {s['adapter_bytes'] / 1e6:.3f} MB, base {s['base_bytes'] / 1e6:.3f} MB: "
        f"{s['bytes_fraction']:.1%} of the bytes, {s['params_fraction']:.1%} of the parameters",
        f"memory, one replica for student and base: weights {m['adapter']['weight_bytes'] / 1e6:.2f} MB, "
        f"RSS added {m['adapter']['rss_added'] / 1e6:.1f} MB",
    ]
    if m.get("two_full"):
        lines.append(
            f"memory, two full models: weights {m['two_full']['weight_bytes'] / 1e6:.2f} MB, RSS added "
            f"{m['two_full']['rss_added'] / 1e6:.1f} MB; weights ratio {m['weights_ratio']:.3f}"
        )
    if "portability" in result:
        p = result["portability"]
        lines.append(f"portability (evaluation {p['evaluation']}, floor FID {p['floor']:.2f}):")
        for r in p["rows"]:
            lines.append(
                f"  {r['model']:<32} @{r['steps']}  FID {r['fid']:.2f} [{r['fid_low']:.2f}, {r['fid_high']:.2f}]"
                f"  class accuracy {r['class_accuracy']}"
            )
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
