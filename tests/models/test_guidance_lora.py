"""Guidance distillation and LoRA adapters against closed forms and their own definitions.

The closed form: two classes, x_1 | y ~ N(mu_y, diag(sigma^2)), x_0 ~ N(0, I) coupled independently.
The conditional velocity of the straight path is exact (toy.GaussianVelocity, one per class), and
the unconditional one is the class-posterior mixture of the two, so classifier-free guidance
v_u + w (v_c - v_u) is exact at every w.
"""

import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from toy import F64, MU, SIGMA, GaussianVelocity, random_dit  # noqa: E402

from models.dit import DiT, dit_config  # noqa: E402
from models.guidance_distill import GuidanceDistillation  # noqa: E402
from models.guided_dit import GuidedDiT, guided_from_velocity  # noqa: E402
from models.lora import (  # noqa: E402
    LoRADiT,
    LoRALinear,
    adapter_state,
    lora_from_velocity,
    merge_lora,
    with_adapter,
)
from models.registry import build_model, model_spec  # noqa: E402
from models.samplers import guided_velocity, sample_ode  # noqa: E402
from models.sampling import SAMPLERS, network_passes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoGaussians(nn.Module):
    """The exact velocities of two equally likely classes N(mu_k, diag(sigma^2)); label 2 is null.

    Conditional: class k's Gaussian velocity. Null: E[x_1 - x_0 | x_t] under the mixture,
    sum_k p(k | x_t) v_k(x_t, t), with p(k | x_t) from N(x_t; t mu_k, diag(s_t^2)).
    """

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.classes = nn.ModuleList([GaussianVelocity(MU, SIGMA), GaussianVelocity(-MU, SIGMA)])

    def forward(self, x, t, y):
        v = torch.stack([c(x, t, y) for c in self.classes])  # (2, N, D)
        tt = t.to(x.dtype)[:, None]
        var = self.classes[0].variance(tt)  # (N, D)
        logp = torch.stack([-(x - tt * c.mu).pow(2).div(2 * var).sum(1) for c in self.classes])  # (2, N)
        post = logp.softmax(0)[..., None]  # (2, N, 1)
        v_null = (post * v).sum(0)
        v_cond = torch.where((y == 0)[:, None], v[0], v[1])
        return torch.where((y == 2)[:, None], v_null, v_cond)


class ToyGuidedMLP(nn.Module):
    """v(x, t, y, w) for (N, D) points: an MLP on [x, sin/cos of t, w] plus a label embedding."""

    embeds_guidance = True
    num_classes = 2

    def __init__(self, dim=3, hidden=128):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(3, dtype=F64), persistent=False)
        self.inp = nn.Linear(dim + 6 + 1, hidden)
        self.label = nn.Embedding(3, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, y, guidance=None):
        w = torch.ones_like(t) if guidance is None else torch.as_tensor(guidance, dtype=x.dtype).expand_as(t)
        a = t[:, None] * self.freqs
        h = self.inp(torch.cat([x, a.sin(), a.cos(), w[:, None]], 1)) + self.label(y)
        return self.body(h)


def toy_batch(n, g):
    y = torch.randint(0, 2, (n,), generator=g)
    mu = torch.where((y == 0)[:, None], MU, -MU)
    return {"x_1": mu + SIGMA * torch.randn(n, 3, generator=g, dtype=F64), "y": y}


# --------------------------------------------------------------------------- guidance distillation


def test_the_target_is_the_teachers_cfg_velocity_and_at_w_1_the_conditional_one():
    teacher = TwoGaussians()
    objective = GuidanceDistillation(teacher, scales=(0.0, 4.0), label_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 3, generator=g, dtype=F64), torch.rand(64, generator=g, dtype=F64)
    y = torch.randint(0, 2, (64,), generator=g)
    v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 2))
    assert not torch.allclose(v_c, v_u, atol=1e-2)  # guidance changes something here
    for w in (0.0, 1.0, 2.5):
        target = objective.target(x, t, y, torch.full_like(t, w))
        assert torch.allclose(target, v_u + w * (v_c - v_u), atol=1e-12)
    assert torch.allclose(objective.target(x, t, y, torch.ones_like(t)), v_c, rtol=0, atol=1e-14)  # w = 1: v_c
    # a null row's target is the unconditional velocity whatever w is
    null = torch.full_like(y, 2)
    assert torch.allclose(objective.target(x, t, null, torch.full_like(t, 3.0)), v_u, atol=1e-12)


def test_a_share_of_rows_is_distilled_at_w_1_exactly_and_the_rest_across_the_range():
    objective = GuidanceDistillation(TwoGaussians(), scales=(1.5, 4.0), conditional_fraction=0.25)
    w = objective.draw_scales(400, torch.zeros(1, dtype=F64), torch.Generator().manual_seed(0))
    assert bool((w[:100] == 1.0).all()) and bool(((w[100:] >= 1.5) & (w[100:] <= 4.0)).all())
    assert w[100:].std() > 0.5  # spread over the range, not one value


def test_a_short_distillation_learns_the_guided_velocity_at_w_1_and_beyond():
    torch.manual_seed(0)
    teacher, student = TwoGaussians(), ToyGuidedMLP().to(F64)
    objective = GuidanceDistillation(teacher, scales=(1.0, 3.0), label_dropout=0.1)
    g = torch.Generator().manual_seed(1)
    test = toy_batch(512, g)
    x_0 = torch.randn(512, 3, generator=g, dtype=F64)
    t = torch.rand(512, generator=g, dtype=F64)
    x_t = (1 - t[:, None]) * x_0 + t[:, None] * test["x_1"]

    def error(w):
        with torch.no_grad():
            want = objective.target(x_t, t, test["y"], torch.full_like(t, w))
            return (student(x_t, t, test["y"], w) - want).pow(2).mean().item(), want.pow(2).mean().item()

    before = error(1.0)[0]
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(600):
        loss = objective.loss(student, toy_batch(256, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for w in (1.0, 3.0):
        err, scale = error(w)
        assert err < 0.03 * scale, (w, err, scale)  # within a few percent of the target's energy
    assert error(1.0)[0] < 0.1 * before
    # and w is used: the student's outputs at 1 and 3 differ as the teacher's do
    with torch.no_grad():
        gap = (student(x_t, t, test["y"], 3.0) - student(x_t, t, test["y"], 1.0)).pow(2).mean()
        want = (objective.target(x_t, t, test["y"], 3 * torch.ones_like(t)) - teacher(x_t, t, test["y"])).pow(2).mean()
    assert abs(gap - want) < 0.2 * want


def dit_inputs(n=4, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype)
    return x, t, torch.tensor([0, 1, 2, 3])[:n]


def test_a_guided_dit_built_from_a_dit_is_its_conditional_velocity_at_every_scale():
    teacher = random_dit()
    net = guided_from_velocity(teacher)
    x, t, y = dit_inputs()
    v = teacher(x, t, y)
    for w in (None, 1.0, 3.0, torch.full_like(t, 7.0)):
        assert torch.allclose(net(x, t, y, w), v, atol=1e-12)
    with torch.no_grad():  # trained: the scale is used, except at w = 1, which stays exactly v_1
        for p in net.guidance_embedder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.equal(net(x, t, y, 1.0), net(x, t, y))
    assert not torch.allclose(net(x, t, y, 3.0), net(x, t, y), atol=1e-4)
    rebuilt = build_model(model_spec(net)).to(F64)
    rebuilt.load_state_dict(net.state_dict())
    assert isinstance(rebuilt, GuidedDiT) and torch.equal(rebuilt(x, t, y, 2.0), net(x, t, y, 2.0))
    with pytest.raises(ValueError, match="guidance must be a number or have shape"):
        net(x, t, y, torch.ones(3, dtype=F64))


def test_a_guided_network_samples_in_one_pass_a_step_where_cfg_takes_a_doubled_batch():
    teacher = random_dit()
    student = guided_from_velocity(teacher)
    batches = {"teacher": [], "student": []}
    teacher.register_forward_hook(lambda m, a, out: batches["teacher"].append(a[0].shape[0]))
    student.register_forward_hook(lambda m, a, out: batches["student"].append(a[0].shape[0]))
    x, _, y = dit_inputs()
    sample_ode(teacher, x, y, steps=3, guidance=2.0)
    sample_ode(student, x, y, steps=3, guidance=2.0)
    assert batches == {"teacher": [8, 8, 8], "student": [4, 4, 4]}
    assert network_passes(SAMPLERS["euler"], 2.0) == 2
    assert network_passes(SAMPLERS["euler"], 2.0, embedded=True) == 1
    t = torch.full((4,), 0.3, dtype=F64)
    assert torch.equal(guided_velocity(student, 2.0)(x, t, y), student(x, t, y, 2.0))


# --------------------------------------------------------------------------- LoRA


def lora_net(rank=4, seed=0, trained=False):
    net = lora_from_velocity(random_dit(seed), rank=rank, alpha=2.0 * rank)
    if trained:  # as if trained: the up-projections off zero
        with torch.no_grad():
            for layer in net.adapters():
                layer.lora_up.add_(0.05 * torch.randn_like(layer.lora_up))
    return net


def test_lora_at_init_leaves_the_model_unchanged():
    base = random_dit()
    net = lora_from_velocity(base, rank=4)
    x, t, y = dit_inputs()
    assert torch.equal(net(x, t, y), base(x, t, y))
    adapted = list(net.adapters())
    assert len(adapted) == 4 * len(net.blocks) and all(bool((a.lora_up == 0).all()) for a in adapted)
    assert all(bool((a.lora_down != 0).any()) for a in adapted)  # A random, or B would get no gradient


def test_merged_and_unmerged_adapters_give_the_same_output():
    net = lora_net(trained=True).float()
    x, t, y = dit_inputs(dtype=torch.float32)
    merged = merge_lora(net)
    assert type(merged) is DiT
    assert torch.allclose(merged(x, t, y), net(x, t, y), atol=1e-5)
    assert not torch.allclose(net(x, t, y), random_dit().float()(x, t, y), atol=1e-4)  # the adapter does something


def test_switching_the_adapters_off_gives_the_base_back():
    base, net = random_dit(), lora_net(trained=True)
    x, t, y = dit_inputs()
    with net.adapters_enabled(False):
        assert torch.equal(net(x, t, y), base(x, t, y))
    assert not torch.allclose(net(x, t, y), base(x, t, y), atol=1e-4)  # back on after the block


def test_only_the_adapters_train_and_they_are_a_small_file():
    net = lora_net(rank=4)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_down", "lora_up")) for n in trainable)
    adapter = adapter_state(net)
    assert set(adapter) == trainable
    total = sum(v.numel() for v in net.state_dict().values())
    assert sum(v.numel() for v in adapter.values()) < 0.25 * total


def test_a_stored_adapter_applies_to_its_base_and_to_a_fine_tuned_one():
    net = lora_net(trained=True)
    spec = model_spec(net)
    assert spec["kind"] == "lora_dit" and build_model(spec).config == net.config  # the spec round-trips
    base = random_dit()
    again = with_adapter(base, net.config, adapter_state(net))
    x, t, y = dit_inputs()
    assert torch.equal(again(x, t, y), net(x, t, y))
    tuned = random_dit()
    with torch.no_grad():  # "fine-tuned": the base moves a little
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ported = with_adapter(tuned, net.config, adapter_state(net))
    assert not torch.equal(ported(x, t, y), again(x, t, y))
    with pytest.raises(ValueError, match="another shape"):
        with_adapter(DiT(dit_config("DiT-T/2", input_size=8, in_channels=2, num_classes=3, depth=3)), net.config, {})
    with pytest.raises(ValueError, match="does not fit"):
        with_adapter(base, net.config, {})


def test_a_lora_linear_is_its_base_linear_plus_the_low_rank_update():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    layer = LoRALinear.wrapping(linear, rank=2, scale=0.5)
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(3, 6)
    want = linear(x) + 0.5 * x @ layer.lora_down.T @ layer.lora_up.T
    assert torch.allclose(layer(x), want, atol=1e-6)
    assert isinstance(lora_net(), LoRADiT)
