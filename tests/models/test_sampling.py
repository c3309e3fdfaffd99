"""Sampler objects: chosen once from a generator's family, the same for evaluation and serving."""

from __future__ import annotations

import pytest
import torch

from models.consistency import consistency_sample
from models.diffusion import ddim_sample, ddpm_sample, vp_schedule
from models.dit import DiT, dit_config
from models.flowmap import flowmap_sample
from models.flowmap_dit import flowmap_from_velocity
from models.samplers import sample_ode
from models.sampling import FAMILIES, SAMPLERS, family_samplers, get_sampler, preferred_sampler


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    net = DiT(dit_config("DiT-T/2", input_size=4, in_channels=2, num_classes=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_every_family_offers_known_samplers_and_each_name_is_its_table_name():
    assert {family: [s.name for s in family_samplers(family)] for family in FAMILIES} == {
        "flow": ["euler", "heun"],
        "consistency": ["consistency"],
        "flowmap": ["flowmap"],
        "diffusion": ["ddim", "ddpm"],
    }
    assert all(sampler.name == name for name, sampler in SAMPLERS.items())
    with pytest.raises(ValueError, match="unknown generator family 'gan'"):
        family_samplers("gan")
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        get_sampler("dpm")


def test_the_preferred_solver_applies_only_where_the_family_offers_it():
    assert preferred_sampler("flow", "heun").name == "heun"
    assert preferred_sampler("consistency", "heun").name == "consistency"
    assert preferred_sampler("flowmap", "heun").name == "flowmap"
    assert preferred_sampler("diffusion", "euler").name == "ddim"  # deterministic, the better at few steps


def test_samplers_are_the_math_they_wrap():
    net = tiny_dit()
    x_0, z, y = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    heun = get_sampler("heun")
    assert heun.noise_draws(3) == 1 and heun.guided and heun.has_path
    out = heun.sample(net, [x_0], y, 3, 2.0)
    torch.testing.assert_close(out.x_1, sample_ode(net, x_0, y, 3, "heun", 2.0).x_1)
    assert out.nfe == 6 * 1  # 2 evaluations a step; guidance doubles the batch, not the count

    consistency = get_sampler("consistency")
    assert consistency.noise_draws(2) == 2 and not consistency.guided and not consistency.has_path
    out = consistency.sample(net, [x_0, z], y, 2, 7.0)  # guidance is ignored
    torch.testing.assert_close(out.x_1, consistency_sample(net, x_0, y, 2, noise=[z]).x_1)


def test_a_consistency_sampler_carries_what_its_student_was_trained_for():
    net = tiny_dit()
    x_0, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])
    (coupled,) = family_samplers("consistency", coupling=1.0, num_intervals=8)
    assert coupled.noise_draws(4) == 1 and coupled.max_steps == 8  # re-noised along x_0: no extra draws
    expected = consistency_sample(net, x_0, y, 4, coupling=1.0, num_intervals=8).x_1
    torch.testing.assert_close(coupled.sample(net, [x_0], y, 4, 1.0).x_1, expected)
    (fresh,) = family_samplers("consistency")
    assert fresh.noise_draws(4) == 4 and fresh.max_steps is None


def test_a_flowmap_sampler_jumps_on_i_over_k_and_guides_only_a_student_trained_for_it():
    net = flowmap_from_velocity(tiny_dit())
    with torch.no_grad():  # the second time in use
        for p in net.gap_embedder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_0, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])
    (in_target,) = family_samplers("flowmap", coupling=0.0, num_intervals=None)
    assert in_target.noise_draws(4) == 1 and not in_target.guided and in_target.max_steps is None
    out = in_target.sample(net, [x_0], y, 4, 3.0)  # guidance is in its targets: the scale is ignored
    assert out.nfe == 4
    torch.testing.assert_close(out.x_1, flowmap_sample(net, x_0, y, 4).x_1)
    (guided,) = family_samplers("flowmap", guided=True)
    assert guided.guided
    torch.testing.assert_close(guided.sample(net, [x_0], y, 2, 3.0).x_1, flowmap_sample(net, x_0, y, 2, 3.0).x_1)
    assert not torch.allclose(guided.sample(net, [x_0], y, 2, 3.0).x_1, flowmap_sample(net, x_0, y, 2).x_1)


def test_diffusion_samplers_run_the_schedule_their_model_was_trained_on():
    net = tiny_dit()
    x_0, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])
    ddim, ddpm = family_samplers(
        "diffusion", diffusion_schedule="cosine", diffusion_steps=40, coupling=0.0, num_intervals=None
    )
    assert (ddim.name, ddpm.name) == ("ddim", "ddpm") and ddim.max_steps == ddpm.max_steps == 40
    assert ddim.guided and ddpm.guided and not ddim.has_path and not ddpm.has_path
    # DDIM draws x_0 only; DDPM x_0 and one z per step but the last.
    assert [ddim.noise_draws(s) for s in (1, 5)] == [1, 1] and [ddpm.noise_draws(s) for s in (1, 5)] == [1, 5]
    schedule = vp_schedule("cosine", 40)

    out = ddim.sample(net, [x_0], y, 5, 2.0)
    assert out.nfe == 5
    torch.testing.assert_close(out.x_1, ddim_sample(net, x_0, y, 5, schedule, guidance=2.0).x_1)
    other = family_samplers("diffusion", diffusion_schedule="linear", diffusion_steps=40)[0].sample(
        net, [x_0], y, 5, 2.0
    )
    assert not torch.allclose(other.x_1, out.x_1)  # the schedule is the model's, not a default

    z = list(torch.randn(4, 4, 2, 4, 4))  # steps - 1 = 4 ancestral draws
    out = ddpm.sample(net, [x_0, *z], y, 5, 1.5)
    torch.testing.assert_close(out.x_1, ddpm_sample(net, x_0, y, 5, schedule, guidance=1.5, noise=z).x_1)
    torch.testing.assert_close(ddpm.sample(net, [x_0, *z], y, 5, 1.5).x_1, out.x_1)  # its draws are the noise given
    assert not torch.allclose(ddpm.sample(net, [x_0, *z[::-1]], y, 5, 1.5).x_1, out.x_1)
    one = ddpm.sample(net, [x_0], y, 1, 1.0)  # one step: no ancestral draw
    torch.testing.assert_close(one.x_1, ddim.sample(net, [x_0], y, 1, 1.0).x_1)
    with pytest.raises(ValueError, match="at most the schedule's T = 40"):
        ddim.sample(net, [x_0], y, 41, 1.0)
