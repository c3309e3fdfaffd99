"""Which base model learns the data? Contenders trained side by side on a store's latents.

    python benchmarks/teacher_sweep.py --store /tmp/sw/store \
        --contender h128d4p2,bs64,lr2e-3 --contender h192d6p2,bs64,lr2e-3 --seconds 600 --json

Each contender is a DiT with AdaLN-Zero (``models.dit``) trained by flow matching
(``models.objectives.FlowMatching``, label dropout 0.1) in a plain PyTorch loop on the stored
latents, the same arithmetic as the base stage without Ray, for ``--steps`` optimiser steps or
``--seconds`` of wall time, whichever ends first. Its EMA is then sampled with Euler at
``--sample-steps`` at each ``--guidance`` scale, decoded by the store's VAE and scored in the
features stage's space: FID against the real test split with its 95 % bootstrap interval, and
class accuracy of the samples (asked label vs the classifier) with a Wilson interval. The floor
(real train vs test) and the ceiling (VAE reconstructions) are scored in the same call.
``--save DIR`` writes each contender's final EMA state dict to ``DIR/<contender>.pt``
(torch.save) and its architecture to ``DIR/<contender>.json`` (``models.registry.build_model``).

A contender is a comma-separated list of settings (defaults in :data:`DEFAULTS`):

    h128d4p2     hidden 128, depth 4, patch 2 (heads: hidden / 32, at least 2)
    unet64       instead of a DiT, a U-Net (models.unet) of base width 64, channel_mults (1, 2),
                 2 blocks a level, attention at the lowest level (the convolutional contender).
                 unet32 (1.11M parameters) is the width nearest h128d4p2's (1.28M) step time:
                 about 150 vs 100 ms at bs64 on one shared thread; unet64 (4.36M) takes about 450 ms
    bs64         batch size          lr2e-3    learning rate     wu200   warm-up steps
    ema0.999     EMA decay           t:logit   time sampling (logit | uniform)
    mlp4         MLP ratio           th2       torch threads     bf16    bf16 autocast
    compile      torch.compile       cos       cosine decay of the lr to 10 % at --steps

The store needs the preset's latents and features stages. ``fewstep run --preset shapes`` makes
them; so does a short run whose later stages are cut down, since those two stages' keys do not
depend on the later ones (about 7 minutes on 2 cores):

    fewstep run --preset shapes --store /tmp/sw/store --config benchmarks/teacher_sweep_prep.yaml

Compare rows of one run only: they share the floor, the ceiling, the reference resamples and the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.cards import FeaturesCard, LatentsCard  # noqa: E402
from infra.store import Store  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.ema import ema_copy, ema_decay, ema_update  # noqa: E402
from models.metrics import fid_draws, interval  # noqa: E402
from models.objectives import FlowMatching  # noqa: E402
from models.paths import time_sampler  # noqa: E402
from models.registry import model_spec  # noqa: E402
from models.samplers import sample_ode  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from workers.pixels import tensor_to_uint8  # noqa: E402

DEFAULTS = dict(
    hidden=128,
    depth=4,
    patch=2,
    mlp=4.0,
    bs=64,
    lr=2e-3,
    wu=200,
    ema=0.999,
    t="logit",
    threads=1,
    bf16=False,
    compile=False,
    cos=False,
    unet=0,
)


@dataclass
class Contender:
    name: str
    hidden: int
    depth: int
    patch: int
    mlp: float
    bs: int
    lr: float
    wu: int
    ema: float
    t: str
    threads: int
    bf16: bool
    compile: bool
    cos: bool
    unet: int  # U-Net base width; 0 = the DiT
    results: dict = field(default_factory=dict)


def parse_contender(text: str) -> Contender:
    values = dict(DEFAULTS)
    for part in filter(None, text.split(",")):
        if m := re.fullmatch(r"h(\d+)d(\d+)p(\d+)", part):
            values.update(hidden=int(m[1]), depth=int(m[2]), patch=int(m[3]))
        elif m := re.fullmatch(r"unet(\d+)", part):
            values["unet"] = int(m[1])
        elif m := re.fullmatch(r"(bs|wu|th)(\d+)", part):
            values[{"bs": "bs", "wu": "wu", "th": "threads"}[m[1]]] = int(m[2])
        elif m := re.fullmatch(r"(lr|ema|mlp)([0-9.e-]+)", part):
            values[m[1]] = float(m[2])
        elif m := re.fullmatch(r"t:(logit|uniform)", part):
            values["t"] = m[1]
        elif part in ("bf16", "compile", "cos"):
            values[part] = True
        else:
            raise SystemExit(f"unknown contender setting {part!r} in {text!r}: see the module docstring")
    return Contender(name=text, **values)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def load_latents(store: Store, latents_ref: str) -> tuple[LatentsCard, torch.Tensor, torch.Tensor]:
    manifest = store.get_ref(latents_ref)
    card = LatentsCard.from_manifest(manifest)
    table = store.read_table(manifest, "latents", columns=["split", "mean", "label"])
    train = np.asarray(table.column("split").to_pylist()) == "train"
    mean = np.stack([np.asarray(v, np.float32) for v in table.column("mean").to_pylist()])[train]
    labels = np.asarray(table.column("label").to_pylist(), np.int64)[train]
    x = torch.from_numpy(mean).reshape(len(mean), *card.latent_shape) * card.latent_scale
    return card, x, torch.from_numpy(labels)


def build_net(c: Contender, card: LatentsCard) -> torch.nn.Module:
    """The contender's network: a U-Net when it names one, else the DiT."""
    channels, size, _ = card.latent_shape
    if c.unet:
        return UNet(
            UNetConfig(
                in_channels=channels,
                input_size=size,
                base_channels=c.unet,
                channel_mults=(1, 2),
                blocks_per_level=2,
                num_classes=card.num_classes,
                attention=True,
            )
        )
    return DiT(
        DiTConfig(
            input_size=size,
            patch_size=c.patch,
            in_channels=channels,
            hidden_size=c.hidden,
            depth=c.depth,
            num_heads=max(2, c.hidden // 32),
            mlp_ratio=c.mlp,
            num_classes=card.num_classes,
        )
    )


def train(
    c: Contender,
    card: LatentsCard,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seconds: float,
    seed: int,
    eval_at: tuple[int, ...] = (),
):
    """Yields (step, EMA network, info) at each step of ``eval_at`` and at the end."""
    torch.set_num_threads(c.threads)
    torch.manual_seed(seed)
    net = build_net(c, card)
    ema = ema_copy(net)
    objective = FlowMatching(time_sampler("logit_normal" if c.t == "logit" else "uniform"), label_dropout=0.1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=0.0)
    model = torch.compile(net) if c.compile else net
    n = len(x)
    started, step, losses = time.perf_counter(), 0, []
    params = sum(p.numel() for p in net.parameters())

    def info(step: int) -> dict:
        elapsed = time.perf_counter() - started
        return dict(
            steps=step,
            seconds=round(elapsed, 1),
            steps_per_s=round(step / elapsed, 2),
            params=params,
            loss_curve=losses[-3:],
        )

    order = torch.randperm(n)
    position = 0
    while step < steps and time.perf_counter() - started < seconds:
        if position + c.bs > n:
            order, position = torch.randperm(n), 0
        index = order[position : position + c.bs]
        position += c.bs
        lr = c.lr * min(1.0, (step + 1) / max(1, c.wu))
        if c.cos:
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
            loss = objective.loss(model, {"x_1": x[index], "y": y[index]}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, net, ema_decay(step, c.ema, 10))
        step += 1
        if step % 200 == 0:
            losses.append((step, float(loss)))
        if step in eval_at and step < steps:
            paused = time.perf_counter()
            yield step, ema.eval(), info(step)
            ema.train()
            torch.set_num_threads(c.threads)  # the scoring may have used other thread counts
            started += time.perf_counter() - paused  # the scoring is not training time
    yield step, ema.eval(), info(step)


@torch.no_grad()
def sample_pixels(net, vae, card: LatentsCard, n: int, steps: int, guidance: float, seed: int, threads: int):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % card.num_classes
    out = []
    for i in range(0, n, 500):
        x0 = torch.randn((min(500, n - i), *card.latent_shape), generator=g)
        z = sample_ode(net, x0, labels[i : i + len(x0)], steps, "euler", guidance).x_1 / card.latent_scale
        out.append(tensor_to_uint8(vae.decode(z)))
    return np.concatenate(out), labels.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--latents", help="latents ref (default: the newest)")
    parser.add_argument("--features", help="features ref (default: the newest)")
    parser.add_argument("--contender", action="append", required=True)
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--n", type=int, default=1000, help="generated images per guidance scale")
    parser.add_argument("--sample-steps", type=int, default=16)
    parser.add_argument("--guidance", default="1,2,3,4")
    parser.add_argument("--eval-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-at", help="also score each contender at these steps, e.g. 2000,4000")
    parser.add_argument("--grids", help="folder for one sample grid per contender and scale")
    parser.add_argument("--save", help="folder for each contender's final EMA state dict, <contender>.pt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from infra.config import EvaluateConfig  # noqa: E402
    from workers.data import read_split  # noqa: E402
    from workers.evaluation.references import reconstruct  # noqa: E402
    from workers.evaluation.scoring import Scorer, extractor_source  # noqa: E402 (imports ray)
    from workers.vae_kinds import load_vae  # noqa: E402

    store = Store.open(args.store)
    latents = store.get_ref(args.latents) if args.latents else store.list_manifests("latents")[-1]
    features = store.get_ref(args.features) if args.features else store.list_manifests("features")[-1]
    card, x, y = load_latents(store, latents.ref)
    vae = load_vae(store, store.get_ref(card.vae_ref)).eval()
    images = store.get_ref(FeaturesCard.from_manifest(features).images_ref)
    torch.set_num_threads(args.eval_threads)
    scorer = Scorer.load(store, extractor_source(EvaluateConfig(), features), features.ref, "cpu")
    test = read_split(store, images, "test")
    real_train = read_split(store, images, "train", args.n)
    recon = reconstruct(vae, real_train.pixels, torch.device("cpu"))
    ref = scorer.score(test.pixels, test.labels)
    base_rows = {
        "floor": scorer.score(real_train.pixels, real_train.labels),
        "ceiling": scorer.score(recon, real_train.labels),
    }
    print(f"latents {latents.ref} ({len(x)} train rows, {card.latent_shape}), features {features.ref}", flush=True)

    scales = [float(s) for s in args.guidance.split(",")]
    contenders = [parse_contender(text) for text in args.contender]
    eval_at = tuple(int(v) for v in args.eval_at.split(",")) if args.eval_at else ()
    scored = dict(base_rows)
    rows = []  # (contender, step, info, scale, row name)
    for c in contenders:
        for step, net, info in train(c, card, x, y, args.steps, args.seconds, args.seed, eval_at):
            print(f"trained {c.name} to step {step}: {info}", flush=True)
            for w in scales:
                pixels, labels = sample_pixels(
                    net, vae, card, args.n, args.sample_steps, w, args.seed + 1, args.eval_threads
                )
                name = f"{c.name}@{step}@{w:g}"
                scored[name] = scorer.score(pixels, labels)
                rows.append((c, step, info, w, name))
                if args.grids:
                    from workers.evaluation.grids import make_grid  # noqa: E402

                    Path(args.grids).mkdir(parents=True, exist_ok=True)
                    safe = re.sub(r"[^A-Za-z0-9.]+", "_", name)
                    (Path(args.grids) / f"{safe}.png").write_bytes(make_grid(pixels, labels, card.num_classes))
        if args.save:  # the EMA network of the last step
            Path(args.save).mkdir(parents=True, exist_ok=True)
            stem = Path(args.save) / re.sub(r"[^A-Za-z0-9.]+", "_", c.name)
            torch.save(net.state_dict(), stem.with_name(stem.name + ".pt"))
            stem.with_name(stem.name + ".json").write_text(json.dumps(model_spec(net)))

    draws = fid_draws(
        torch.from_numpy(ref.features),
        {k: torch.from_numpy(v.features) for k, v in scored.items()},
        resamples=100,
        seed=args.seed,
    )
    summary = {}
    for name, s in scored.items():
        fid = interval(draws[name])
        correct = int((s.logits.argmax(1) == s.labels).sum())
        acc = correct / len(s.labels)
        summary[name] = dict(
            fid=round(fid.value, 1),
            fid_corrected=round(fid.corrected, 1),  # the point the interval is built around
            fid_low=round(fid.low, 1),
            fid_high=round(fid.high, 1),
            acc=round(acc, 3),
            acc_interval=[round(v, 3) for v in wilson(correct, len(s.labels))],
        )
    floor, ceiling = summary["floor"]["fid"], summary["ceiling"]["fid"]
    print(f"\nfloor FID {floor} acc {summary['floor']['acc']}; ceiling FID {ceiling} acc {summary['ceiling']['acc']}")
    print(
        f"{'contender':<40} {'steps':>6} {'s':>6} {'params':>8} {'w':>4} {'FID* [95%] (plug-in)':>32} {'excess/ceil':>11} "
        f"{'class acc [95%]':>22}"
    )
    for c, step, info, w, name in rows:
        r = summary[name]
        ratio = (r["fid"] - floor) / max(1e-9, ceiling - floor)
        print(
            f"{c.name:<40} {step:>6} {info['seconds']:>6.0f} {info['params']:>8} {w:>4g} "
            f"{r['fid_corrected']:>7.1f} [{r['fid_low']:.1f}, {r['fid_high']:.1f}] ({r['fid']:.1f}) {ratio:>11.1f} "
            f"{r['acc']:>7.3f} [{r['acc_interval'][0]:.3f}, {r['acc_interval'][1]:.3f}]"
        )
        c.results.setdefault("rows", []).append(dict(step=step, guidance=w, excess_over_ceiling=ratio, **info, **r))
    if args.json:
        print(
            json.dumps(
                {
                    "floor": summary["floor"],
                    "ceiling": summary["ceiling"],
                    "contenders": [asdict(c) for c in contenders],
                }
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
