"""Base, reflow pairs, reflow, consistency, flowmap, guidance_distill, lora and ddpm stages on tiny synthetic
latents, through the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from infra.cards import GeneratorCard, LatentsCard
from infra.config import (
    ConfigError,
    ConsistencyConfig,
    DDPMConfig,
    FlowMapConfig,
    GeneratorConfig,
    GuidanceDistillConfig,
    LoRAConfig,
    PairsConfig,
    ReflowConfig,
)
from infra.store import Store
from infra.tables import table_column_to_numpy, tensors_to_table
from models.consistency import consistency_sample
from models.diffusion import ddim_sample, vp_schedule
from models.dit import DiT, dit_config
from models.flowmap_dit import FlowMapDiT
from models.guided_dit import GuidedDiT
from models.lora import LoRADiT
from models.registry import model_spec
from models.sampling import SAMPLERS, family_samplers, network_passes
from workers.generator import load_network
from workers.stages.s04_base import run_base
from workers.stages.s05_pairs import run_pairs
from workers.stages.s06_reflow import run_reflow
from workers.stages.s07_consistency import run_consistency
from workers.stages.s08_ddpm import run_ddpm
from workers.stages.s13_flowmap import run_flowmap
from workers.stages.s14_guidance import run_guidance_distill
from workers.stages.s15_lora import run_lora

pytestmark = pytest.mark.timeout(600)

SHAPE = (2, 4, 4)
LOOP = dict(batch_size=16, lr=3e-3, warmup_steps=0, checkpoint_every=10, label_dropout=0.1)
TINY = dict(model="DiT-T/2", **LOOP)  # a stage that builds its own DiT (base, ddpm)
LOCAL = dict(resources={"workers": 0})  # Ray Train's local mode: no worker group to start per stage


def commit_latents(store: Store, n: int = 64, n_test: int = 0):
    """A latents table like the latents stage writes: two classes with different means; the
    last ``n_test`` rows are the test split."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    mean = rng.standard_normal((n, *SHAPE)).astype(np.float32) * 0.3 + np.where(labels, 1.0, -1.0)[:, None, None, None]
    table = tensors_to_table(
        {
            "id": np.array([f"img{i}" for i in range(n)]),
            "split": np.array(["train"] * (n - n_test) + ["test"] * n_test),
            "label": labels.astype(np.int64),
            "mean": mean,
            "logvar": np.full((n, *SHAPE), -6.0, np.float32),
        }
    )
    with store.begin("latents", f"synthetic-{n_test}", config={"n": n}) as writer:
        writer.write_table("latents", table)
        card = LatentsCard(
            latent_shape=SHAPE,
            num_classes=2,
            latent_scale=1.0,
            vae_ref="vae/none",
            n_latents=n,
            n_train=n - n_test,
            n_test=n_test,
            dtype="float32",
        )
        return writer.commit(metrics=card.to_metrics())


def test_pairs_and_consistency_refuse_an_unresolved_guidance(tmp_path):
    """None ("the base model's best") is the flow's to resolve; a stage handed it refuses before any work."""
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store)
    assert PairsConfig().guidance is None and ConsistencyConfig().guidance is None
    with pytest.raises(ConfigError, match=r"pairs.guidance is None .*set pairs.guidance in the config"):
        run_pairs(store, PairsConfig(pairs=8), latents, round_index=1)
    with pytest.raises(ConfigError, match=r"consistency.guidance is None .*set consistency.guidance"):
        run_consistency(store, ConsistencyConfig(steps=1, **LOOP), latents, latents)
    with pytest.raises(ConfigError, match=r"flowmap.guidance is None .*set flowmap.guidance"):
        run_flowmap(store, FlowMapConfig(steps=1, **LOOP), latents, latents)
    assert store.list_manifests("pairs") == [] and store.list_manifests("consistency") == []
    assert store.list_manifests("flowmap") == []


def test_base_reflow_consistency_chain(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store, n=80, n_test=16)

    base = run_base(store, GeneratorConfig(steps=20, **TINY), latents)
    card = GeneratorCard.from_manifest(base)
    assert card.family == "flow" and card.steps == 20 and card.vae_ref == "vae/none"
    assert {"model", "raw", "curve"} <= set(base.files)
    # The held-out loss of the EMA and raw weights at each checkpoint (10, 20: logged there although
    # log_every is 25), on the 16 test latents, in the curve and the card.
    record = store.read_json(base, "curve")
    heldout = [e for e in record["curve"] if "heldout_loss" in e]
    assert [e["step"] for e in heldout] == [10, 20] and all(e["heldout_loss_raw"] > 0 for e in heldout)
    assert record["heldout"].startswith(f"16 test latents of {latents.ref}")
    assert card.final_heldout_loss == heldout[-1]["heldout_loss"] and card.heldout == record["heldout"]
    net = store.load_model(base, "model")
    assert net.num_classes == 2 and net.config.input_size == 4

    # Content addressing: the same config and inputs return the committed stage.
    assert run_base(store, GeneratorConfig(steps=20, **TINY), latents).ref == base.ref

    pairs_cfg = PairsConfig(pairs=24, steps=4, solver="euler", batch_size=8, guidance=1.5)
    reflow_cfg = ReflowConfig(rounds=1, steps=10, **LOOP)
    pairs = run_pairs(store, pairs_cfg, base, round_index=1)
    table = store.read_table(pairs, "pairs")
    x_0, x_1 = table_column_to_numpy(table, "x_0"), table_column_to_numpy(table, "x_1")
    assert x_0.shape == (24, *SHAPE) and x_1.shape == (24, *SHAPE)
    assert list(table.column("label").to_pylist()) == [i % 2 for i in range(24)]
    assert not np.allclose(x_0, x_1)
    # Per-row seeds: a second pairs stage with another actor batch size draws the same noise.
    again = run_pairs(store, pairs_cfg.model_copy(update={"batch_size": 5}), base, round_index=1)
    assert again.ref != pairs.ref
    np.testing.assert_allclose(table_column_to_numpy(store.read_table(again, "pairs"), "x_0"), x_0)
    # Readable without fewstep.
    frame = pd.read_parquet(store.file_path(pairs, "pairs"))
    assert len(frame) == 24 and {"x_0", "x_1", "label"} <= set(frame.columns)

    reflow = run_reflow(store, reflow_cfg, base, pairs, round_index=1)
    reflow_card = GeneratorCard.from_manifest(reflow)
    # Reflow's pairs have no test split: its held-out set is the base's test latents, and it says so.
    assert reflow_card.final_heldout_loss is not None and "no test split" in reflow_card.heldout
    assert reflow_card.teacher_ref == base.ref and reflow.inputs == [base.ref, pairs.ref]
    assert reflow_card.round == 1 and reflow_card.guidance == 1.5  # sampled at its pairs' guidance

    consistency_cfg = ConsistencyConfig(intervals=4, steps=10, guidance=2.0, **LOOP)
    consistency = run_consistency(store, consistency_cfg, reflow, pairs)
    assert GeneratorCard.from_manifest(consistency).family == "consistency"
    assert GeneratorCard.from_manifest(consistency).guidance == 2.0  # the teacher scale it was distilled at
    student = store.load_model(consistency, "model")
    x = consistency_sample(student, torch.randn(3, *SHAPE), torch.tensor([0, 1, 2]), steps=2).x_1
    assert x.shape == (3, *SHAPE) and torch.isfinite(x).all()

    # The flow-map student of the reflow round on its pairs (MeanFlow, guidance in the target), and of
    # the base model on the latents (Shortcut, guidance applied when sampling).
    teacher_net = store.load_model(reflow, "model")
    meanflow = run_flowmap(store, FlowMapConfig(objective="meanflow", steps=10, guidance=2.0, **LOOP), reflow, pairs)
    card = GeneratorCard.from_manifest(meanflow)
    assert (card.family, card.objective, card.guidance, card.guided_sampling) == ("flowmap", "meanflow", 2.0, False)
    assert meanflow.inputs == [reflow.ref, pairs.ref] and card.teacher_ref == reflow.ref and card.steps == 10
    student = store.load_model(meanflow, "model")
    assert isinstance(student, FlowMapDiT)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher_net.blocks[0].attn.qkv.weight)  # it trained
    (sampler,) = family_samplers(card.family, **card.sampler_params())
    assert sampler.name == "flowmap" and not sampler.guided
    for steps in (1, 2, 4):
        out = sampler.sample(student, [torch.randn(3, *SHAPE)], torch.tensor([0, 1, 2]), steps, 1.0)
        assert out.x_1.shape == (3, *SHAPE) and torch.isfinite(out.x_1).all() and out.nfe == steps

    shortcut_cfg = FlowMapConfig(
        teacher="base", objective="shortcut", guidance_mode="sampling", guidance=1.0, steps=10, **LOOP
    )
    shortcut = run_flowmap(store, shortcut_cfg, base, latents)
    card = GeneratorCard.from_manifest(shortcut)
    assert (card.objective, card.guidance, card.guided_sampling) == ("shortcut", None, True)
    (sampler,) = family_samplers(card.family, **card.sampler_params())
    assert sampler.guided  # classifier-free guidance on u, at the evaluation's scales
    out = sampler.sample(store.load_model(shortcut, "model"), [torch.randn(3, *SHAPE)], torch.tensor([0, 1, 2]), 2, 2.0)
    assert torch.isfinite(out.x_1).all()


def test_raising_reflow_rounds_reuses_round_one_and_trains_only_round_two(ray_local, tmp_path):
    """rounds is how many rounds the flow runs, not what a round computes: going from 1 to 2 keeps
    round 1's committed pairs and model (their manifests untouched) and trains round 2 only."""
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store)
    base = run_base(store, GeneratorConfig(steps=10, **TINY), latents)
    pairs_cfg = PairsConfig(pairs=16, steps=2, solver="euler", batch_size=8, guidance=1.0)

    def run_rounds(rounds: int) -> list:
        """The flow's reflow loop (flows.pipeline.run_stages), on the stages themselves."""
        config, teacher, made = ReflowConfig(rounds=rounds, steps=10, **LOOP), base, []
        for k in range(1, config.rounds + 1):
            pairs = run_pairs(store, pairs_cfg, teacher, round_index=k)
            teacher = run_reflow(store, config, teacher, pairs, round_index=k)
            made += [pairs, teacher]
        return made

    def manifest_file(manifest) -> Path:
        return tmp_path / "store" / "stages" / manifest.stage / manifest.key / "manifest.json"

    pairs_1, reflow_1 = run_rounds(1)
    before = {m.ref: (manifest_file(m).read_bytes(), manifest_file(m).stat().st_mtime_ns) for m in (pairs_1, reflow_1)}

    again_1, again_reflow_1, pairs_2, reflow_2 = run_rounds(2)
    assert (again_1.ref, again_reflow_1.ref) == (pairs_1.ref, reflow_1.ref)
    for m in (pairs_1, reflow_1):
        assert (manifest_file(m).read_bytes(), manifest_file(m).stat().st_mtime_ns) == before[m.ref]
    # Round 2 trained, from round 1; nothing else was built beside it.
    card = GeneratorCard.from_manifest(reflow_2)
    assert (card.round, card.teacher_ref, card.steps) == (2, reflow_1.ref, 10)
    assert {m.ref for m in store.list_manifests("reflow")} == {reflow_1.ref, reflow_2.ref}
    assert {m.ref for m in store.list_manifests("pairs")} == {pairs_1.ref, pairs_2.ref}


def test_ddpm_stage_trains_eps_prediction_and_writes_a_diffusion_generator(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store)
    config = DDPMConfig(enabled=True, steps=30, schedule="linear", diffusion_steps=50, **TINY)

    ddpm = run_ddpm(store, config, latents)
    card = GeneratorCard.from_manifest(ddpm)
    assert (card.family, card.steps, card.diffusion_schedule, card.diffusion_steps) == ("diffusion", 30, "linear", 50)
    assert ddpm.stage == "ddpm" and ddpm.inputs == [latents.ref] and card.vae_ref == "vae/none"
    assert {"model", "raw", "curve"} <= set(ddpm.files)
    # The same DiT as the base stage: same spec builder, same latents geometry and classes.
    net = store.load_model(ddpm, "model").eval()
    assert net.num_classes == 2 and net.config.input_size == 4 and net.config.in_channels == 2
    # eps-prediction learns: from AdaLN-Zero's zero output (loss E||eps||^2 = 1) far down, and still falling.
    curve = store.read_json(ddpm, "curve")["curve"]
    assert curve[-1]["step"] == 30 and curve[-1]["loss"] < 0.5 and curve[-1]["loss"] < 0.9 * curve[0]["loss"]
    # Content addressing: the same section and inputs return the committed stage; the schedule is in the key.
    assert run_ddpm(store, config, latents).ref == ddpm.ref

    # Its samplers come from its card: the model's own schedule, at most T steps.
    ddim, ddpm_sampler = family_samplers(card.family, **card.sampler_params())
    assert ddim.max_steps == ddpm_sampler.max_steps == 50
    x_0, y = torch.randn(6, *SHAPE), torch.tensor([0, 1, 2, 0, 1, 2])
    out = ddim.sample(net, [x_0], y, 10, 1.0)
    torch.testing.assert_close(out.x_1, ddim_sample(net, x_0, y, 10, vp_schedule("linear", 50)).x_1)
    assert out.nfe == 10 and torch.isfinite(out.x_1).all()
    noise = torch.randn(ddpm_sampler.noise_draws(10), 6, *SHAPE)
    drawn = ddpm_sampler.sample(net, list(noise), y, 10, 2.0)
    assert drawn.nfe == 10 and torch.isfinite(drawn.x_1).all()


def test_guidance_distill_and_lora_stages(ray_local, tmp_path):
    """The guidance-distilled base takes the scale in one pass; the LoRA stage stores only its adapter,
    which loads over its base as a consistency student, and switched off is the base."""
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store, n=64)
    base = run_base(store, GeneratorConfig(steps=10, **TINY, **LOCAL), latents)
    base_net = store.load_model(base, "model")

    guided = run_guidance_distill(
        store, GuidanceDistillConfig(scales=(1.0, 3.0), steps=10, **LOOP, **LOCAL), base, latents
    )
    card = GeneratorCard.from_manifest(guided)
    assert (card.family, card.teacher_ref, guided.inputs) == ("flow", base.ref, [base.ref, latents.ref])
    student = load_network(store, guided)
    assert isinstance(student, GuidedDiT)
    assert bool((student.guidance_embedder.mlp[2].weight != 0).any())  # the scale's embedding trained
    euler = SAMPLERS["euler"]
    assert network_passes(euler, 2.0, embedded=student.embeds_guidance) == 1 and network_passes(euler, 2.0) == 2
    calls = []
    student.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    out = euler.sample(student, [torch.randn(3, *SHAPE)], torch.tensor([0, 1, 2]), 2, 2.0)
    assert calls == [3, 3] and out.nfe == 2 and torch.isfinite(out.x_1).all()  # one pass of the batch a step

    # The students may distil it (teacher: guided): its guided velocity at their scale, one pass a step.
    consistency = run_consistency(
        store, ConsistencyConfig(intervals=4, steps=4, guidance=2.0, **LOOP, **LOCAL), guided, latents
    )
    assert GeneratorCard.from_manifest(consistency).teacher_ref == guided.ref
    assert isinstance(load_network(store, consistency), GuidedDiT)  # its teacher's network, sampled at w = 1
    flowmap = run_flowmap(store, FlowMapConfig(steps=4, guidance=2.0, **LOOP, **LOCAL), guided, latents)
    assert isinstance(load_network(store, flowmap), FlowMapDiT)  # the teacher's weights, its scale's embedder left

    lora_cfg = LoRAConfig(rank=2, intervals=4, steps=10, guidance=2.0, **LOOP, **LOCAL)
    lora = run_lora(store, lora_cfg, base, latents)
    card = GeneratorCard.from_manifest(lora)
    assert (card.family, card.adapter_of, card.guidance, card.steps) == ("consistency", base.ref, 2.0, 10)
    assert {"adapter", "adapter_raw", "adapter_spec"} <= set(lora.files) and "model" not in lora.files
    assert 0 < card.adapter_fraction < 0.2
    adapter_bytes = sum(lora.files[n].size for n in ("adapter", "adapter_raw")) / 2
    assert adapter_bytes < 0.2 * base.files["model"].size  # its own small artifact
    net = load_network(store, lora)
    assert isinstance(net, LoRADiT)
    assert any(bool((layer.lora_up != 0).any()) for layer in net.adapters())  # the adapter trained
    x, t, y = torch.randn(3, *SHAPE), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    with torch.no_grad(), net.adapters_enabled(False):
        assert torch.allclose(net(x, t, y), base_net(x, t, y), atol=1e-6)  # the base's weights, untouched
    (sampler,) = family_samplers(card.family, **card.sampler_params())
    out = sampler.sample(net, [torch.randn(3, *SHAPE) for _ in range(2)], y, 2, 1.0)
    assert out.x_1.shape == (3, *SHAPE) and torch.isfinite(out.x_1).all()
    # An adapter whose base is gone from under it fails naming both.
    with store.begin("base", "other", config={}) as writer:
        other = DiT(dit_config("DiT-T/2", input_size=4, in_channels=2, num_classes=2, depth=1))
        writer.write_model("model", other, model_spec(other))
        wrong = writer.commit(metrics=GeneratorCard.from_manifest(base).to_metrics())
    fake = lora.model_copy(update={"metrics": {**lora.metrics, "adapter_of": wrong.ref}})
    with pytest.raises(ValueError, match=f"adapter {lora.ref} does not go on its base {wrong.ref}"):
        load_network(store, fake)


def test_guidance_distillation_of_an_unlabelled_base_is_refused_before_any_work(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store)
    net = DiT(dit_config("DiT-T/2", input_size=4, in_channels=2, num_classes=0, depth=1))
    with store.begin("base", "unlabelled", config={}) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family="flow", steps=0, latent_shape=SHAPE, num_classes=0, latent_scale=1.0, vae_ref="vae/none"
        )
        base = writer.commit(metrics=card.to_metrics())
    with pytest.raises(ConfigError, match="needs labelled data.*guidance_distill.enabled: false"):
        run_guidance_distill(store, GuidanceDistillConfig(steps=1, **LOOP), base, latents)
    assert store.list_manifests("guidance_distill") == []
