"""DiT: AdaLN-Zero init, shapes, patch order, labels, embeddings against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from models.dit import (
    DIT_PRESETS,
    TIME_SCALE,
    DiT,
    DiTConfig,
    dit_config,
    sincos_2d,
    timestep_features,
)
from models.registry import build_model, model_spec


def _inputs(cfg: DiTConfig, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)  # includes the null id
    return x, t, y


def _randomize_zero_layers(model: DiT, std: float = 0.05) -> None:
    """Give the zero-initialised layers random weights, so the output depends on everything."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_fresh_dit_outputs_exactly_zero(preset):
    # Full width of every preset; one block keeps the big ones cheap (the zero comes from
    # the final layer, every block only has to pass its input through unchanged).
    cfg = dit_config(preset, depth=1, input_size=8, in_channels=4)
    model = DiT(cfg)
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        for mode in (True, False):
            out = model.train(mode)(x, t, y)
            assert out.shape == x.shape
            assert torch.equal(out, torch.zeros_like(out))


def test_fresh_blocks_are_identity():
    cfg = dit_config("DiT-T/2", input_size=8)
    model = DiT(cfg).eval()
    tokens = torch.randn(2, cfg.grid_size**2, cfg.hidden_size)
    c = torch.randn(2, cfg.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_output_shape_equals_input_shape(in_channels, patch_size):
    cfg = DiTConfig(
        input_size=8,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=32,
        depth=1,
        num_heads=4,
    )
    model = DiT(cfg).eval()
    _randomize_zero_layers(model)
    x, t, y = _inputs(cfg, n=5)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert out.abs().sum() > 0


@pytest.mark.parametrize("patch_size", [2, 4])
def test_tokens_map_back_to_their_own_patch(patch_size):
    # With no blocks, each output patch depends only on the same input patch (plus its
    # position). This pins that patchify's token order and unpatchify's layout agree.
    cfg = DiTConfig(input_size=8, patch_size=patch_size, in_channels=2, hidden_size=16, depth=0, num_heads=2)
    model = DiT(cfg).eval()
    _randomize_zero_layers(model)
    x, t, y = _inputs(cfg, n=1)
    base = model(x, t, y)
    i, j = 1, 0  # patch row 1, column 0
    x2 = x.clone()
    x2[:, :, i * patch_size, j * patch_size] += 1.0
    changed = (model(x2, t, y) - base).abs().sum(dim=(0, 1)) > 0  # (H, W)
    expected = torch.zeros_like(changed)
    expected[i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size] = True
    assert torch.equal(changed, expected)


def test_dit_embeds_every_label_it_is_given_and_the_null_label():
    """Label dropout is the objective's (models.objectives): the network keeps labels in train mode too."""
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    model = DiT(cfg)
    _randomize_zero_layers(model)
    x, t, _ = _inputs(cfg)
    y = torch.tensor([0, 3, 7])
    null = torch.full_like(y, cfg.num_classes)
    with torch.no_grad():
        out_train = model.train()(x, t, y)
        out_eval = model.eval()(x, t, y)
        out_null = model.eval()(x, t, null)
    assert torch.equal(out_train, out_eval)
    assert not torch.allclose(out_eval, out_null)
    assert model.num_classes == 10


def test_a_stored_spec_with_the_retired_label_dropout_field_loads_only_at_zero():
    """Specs written before the DiT lost its own label dropout carry."""
    spec = model_spec(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=4)))
    old = {"kind": "dit", "config": {**spec["config"], "class_dropout_prob": 0.0}}
    assert model_spec(build_model(old)) == spec
    with pytest.raises(ValueError, match=r"class_dropout_prob=0.3, which DiTConfig no longer has"):
        build_model({"kind": "dit", "config": {**spec["config"], "class_dropout_prob": 0.3}})


def test_zero_init_layers_learn():
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=4)
    model = DiT(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = _inputs(cfg, n=4)
    target = torch.randn_like(x)

    # Step 1: only the final projection sees a gradient (everything after it is zero).
    loss = (model(x, t, y) - target).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert model.eval()(x, t, y).abs().sum() > 0
    model.train()

    # Step 2: now the gradient reaches the blocks' zero-initialised modulations.
    loss = (model(x, t, y) - target).pow(2).mean()
    loss.backward()
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.grad.abs().sum() > 0
    assert model.final_layer.adaLN_modulation[-1].weight.grad.abs().sum() > 0


def test_position_embedding_closed_form():
    dim, g = 16, 5
    pe = sincos_2d(dim, g)
    assert pe.shape == (g * g, dim)
    q = dim // 4
    # Origin: sin(0) = 0 and cos(0) = 1 in each half.
    assert torch.equal(pe[0], torch.tensor([0.0] * q + [1.0] * q + [0.0] * q + [1.0] * q, dtype=pe.dtype))
    # Token k = i * g + j; the first frequency is 1, so its entries are sin/cos of i and j.
    for i in range(g):
        for j in range(g):
            k = i * g + j
            assert math.isclose(pe[k, 0], math.sin(i), abs_tol=1e-12)
            assert math.isclose(pe[k, q], math.cos(i), abs_tol=1e-12)
            assert math.isclose(pe[k, 2 * q], math.sin(j), abs_tol=1e-12)
            assert math.isclose(pe[k, 3 * q], math.cos(j), abs_tol=1e-12)
    # <e(p), e(r)> = sum_k cos(w_k (p_i - r_i)) + sum_k cos(w_k (p_j - r_j)): depends on offsets only.
    omega = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    coords = [(k // g, k % g) for k in range(g * g)]
    di = torch.tensor([[a[0] - b[0] for b in coords] for a in coords], dtype=torch.float64)
    dj = torch.tensor([[a[1] - b[1] for b in coords] for a in coords], dtype=torch.float64)
    expected = torch.cos(di[..., None] * omega).sum(-1) + torch.cos(dj[..., None] * omega).sum(-1)
    assert torch.allclose(pe @ pe.T, expected, atol=1e-10)


def test_position_embedding_is_fixed_and_not_saved():
    cfg = dit_config("DiT-T/2", input_size=8)
    model = DiT(cfg)
    assert torch.allclose(model.pos_embed[0].double(), sincos_2d(cfg.hidden_size, 4), atol=1e-6)
    assert "pos_embed" not in model.state_dict()
    assert all("pos_embed" not in name for name, _ in model.named_parameters())


def test_timestep_features_scale_t():
    t = torch.tensor([0.0, 0.25, 1.0])
    f = timestep_features(t, 8)
    # first frequency is 1: features are cos / sin of TIME_SCALE * t
    assert torch.allclose(f[:, 0], torch.cos(TIME_SCALE * t))
    assert torch.allclose(f[:, 4], torch.sin(TIME_SCALE * t))
    assert timestep_features(t, 7).shape == (3, 7)


@pytest.mark.parametrize(
    "preset, paper_millions",
    [("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)],
)
def test_paper_presets_have_the_papers_size(preset, paper_millions):
    # The paper's models: 256x256 images -> 32x32x4 latents, 1000 classes (Table 4). Ours has
    # no learned sigma, which removes a few thousand output weights. Built on the meta device.
    with torch.device("meta"):
        model = DiT(dit_config(preset, input_size=32, num_classes=1000))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(paper_millions, rel=0.01)


def test_dit_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"DiT-Q/2.*DiT-B/2"):
        dit_config("DiT-Q/2")
    with pytest.raises(ValueError, match=r"hidden_sise.*hidden_size"):
        dit_config("DiT-T/2", hidden_sise=32)
    with pytest.raises(ValueError, match=r"input_size=10.*patch_size=4"):
        dit_config("DiT-T/2", input_size=10, patch_size=4)
    assert dit_config("DiT-S/2", input_size=8).hidden_size == 384


def test_dit_rejects_wrong_input_shape():
    model = DiT(dit_config("DiT-T/2", input_size=8))
    with pytest.raises(ValueError, match=r"\(N, 4, 8, 8\).*\(2, 4, 16, 16\)"):
        model(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))
