"""DiT: a Diffusion Transformer with AdaLN-Zero conditioning (Peebles & Xie, 2023).

The network predicts the straight-path velocity ``v(x_t, t, y)`` (models/conventions.py):
``x`` (N, C, H, W) is a latent, ``t`` (N,) a time in [0, 1], ``y`` (N,) a class id where
``y == num_classes`` means "no class" (classifier-free guidance).

Data flow::

    x (N, C, H, W) --patchify--> (N, T, D) + fixed 2-D sin-cos positions
    c = t_embed(t) + y_embed(y)                       (N, D)
    depth x DiTBlock(tokens, c)                       attention + MLP, each modulated by c
    FinalLayer(tokens, c) --unpatchify--> v (N, C, H, W)

AdaLN-Zero: every block's shift/scale/gate and the final layer start at zero, so a fresh
DiT is the zero velocity field and each block starts as the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.conventions import VelocityNet
from models.registry import register_kind

# Time is in [0, 1] here; the sinusoidal frequencies below were designed for integer
# diffusion steps 0..999, so t is multiplied by this before embedding.
TIME_SCALE = 1000.0


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Shape of a DiT. Output channels equal input channels (no learned sigma).

    Label dropout for classifier-free guidance is the training objective's (``label_dropout``,
    models.objectives), not the network's: the DiT embeds every label it is given.
    """

    # A field older stored specs carry, with the one value this network still builds: fewstep's
    # stages always stored DiTs with the network's own label dropout off.
    RETIRED: ClassVar[dict[str, Any]] = {"class_dropout_prob": 0.0}

    input_size: int = 16  # latent height == width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 10  # the id num_classes is the null ("no class") label

    def __post_init__(self) -> None:
        if self.depth < 0 or self.input_size < 1 or self.patch_size < 1 or self.in_channels < 1:
            raise ValueError(f"need depth >= 0 and positive input_size, patch_size, in_channels; got {self}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "pick a patch size that divides the latent size"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of 4 "
                "(the 2-D sin-cos position embedding splits it in four)"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 = unconditional)")

    @property
    def grid_size(self) -> int:
        """Tokens per side, input_size / patch_size."""
        return self.input_size // self.patch_size


# Model sizes: T and XS are ours (CPU-sized); S, B, L, XL are the paper's Table 1.
# The latent size and channels come from the data: pass input_size / in_channels as overrides.
DIT_PRESETS: dict[str, dict] = {
    "DiT-T/2": dict(hidden_size=64, depth=3, num_heads=4, patch_size=2),
    # 1.28M parameters: the smallest that learns the shapes benchmark's classes on a CPU budget
    # (BENCHMARKS.md, "A teacher that learns"); DiT-T/2 is capacity-bound there.
    "DiT-XXS/2": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
    "DiT-XS/2": dict(hidden_size=192, depth=6, num_heads=3, patch_size=2),
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """The config of a named preset, with any field replaced by ``overrides``."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    valid = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; valid fields are {sorted(valid)}")
    return DiTConfig(**{**DIT_PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos features of positions ``pos`` (M,) -> (M, dim).

    omega_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1
    e(p) = [sin(p omega_0), ..., sin(p omega_{dim/2-1}), cos(p omega_0), ..., cos(p omega_{dim/2-1})]
    """
    half = dim // 2
    omega = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D position embedding of a ``grid_size`` x ``grid_size`` grid -> (T, dim), float64.

    Token k = i * grid_size + j (row i, column j: the order of ``flatten`` on (h, w)) gets
    e(i, j) = [sincos_1d(dim/2, i), sincos_1d(dim/2, j)],
    so <e(p), e(q)> = sum_k cos(omega_k (p_i - q_i)) + sum_k cos(omega_k (p_j - q_j)).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (h, w) each
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (T,) each
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)  # (T, dim)


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of times ``t`` (N,) in [0, 1] -> (N, dim), in float32.

    s = TIME_SCALE * t,  freq_k = max_period^(-k / (dim/2))
    features = [cos(s freq), sin(s freq)]   (a zero column is appended if dim is odd)
    """
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (TIME_SCALE * t.float())[:, None] * freqs[None, :]  # (N, dim/2)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (N, 2 * half)
    if dim % 2:
        features = F.pad(features, (0, 1))  # (N, dim)
    return features


# ----------------------------------------------------------------------------------------
# Conditioning embedders
# ----------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """t (N,) in [0, 1] -> (N, D): sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_features(t, self.frequency_size)  # (N, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D). Row ``num_classes`` is the null label, always present so that
    classifier-free guidance can ask for it (the objective drops labels to it in training)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding(y)  # (N, D)


# ----------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample (N, D) shift/scale over tokens (N, T, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        n, T, d = x.shape
        qkv = self.qkv(x).reshape(n, T, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, d/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, d/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d/H)
        out = out.transpose(1, 2).reshape(n, T, d)  # (N, T, D)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block whose norms are modulated by the conditioning c (adaLN-Zero).

    x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
    x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # six (N, D) chunks of the (N, 6D) modulation
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map from each token to its patch's p*p*C values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


class DiT(VelocityNet):
    """Velocity network ``v = model(x, t, y)`` for latents of shape (N, C, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.out_channels = config.in_channels
        self.patch_size = config.patch_size
        d = config.hidden_size

        # A stride-p convolution is the patchify-then-linear of the paper.
        self.x_embedder = nn.Conv2d(config.in_channels, d, config.patch_size, config.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        # Fixed, rebuilt from the config: not a parameter and not saved in the state dict.
        self.register_buffer(
            "pos_embed",
            sincos_2d(d, config.grid_size).float()[None],  # (1, T, D)
            persistent=False,
        )
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation, ending in AdaLN-Zero."""
        init_linears_and_patches(self)

        # Conditioning embedders: small normal weights.
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # AdaLN-Zero: zero every modulation linear, so shift = scale = gate = 0 and each
        # block starts as the identity map x -> x ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and zero the final layer's modulation and projection, so a fresh DiT outputs
        # exactly 0 (tests pin this). Gradients still reach these layers: d out / d W_final
        # is the normalised tokens, which are not zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        return unpatchify(tokens, self.patch_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """v(x, t, y): x (N, C, H, W), t (N,) in [0, 1], y (N,) long -> (N, C, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.check_inputs(x, t, y)
        return self.conditioned(x, self.t_embedder(t) + self.y_embedder(y))

    def conditioned(self, x: Tensor, c: Tensor) -> Tensor:
        """The network under conditioning ``c`` (N, D): patchify, the blocks modulated by c, unpatchify.
        Variants that condition on more (a second time, the guidance scale) add their embedding to c."""
        tokens = self.x_embedder(x)  # (N, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)  # (N, T, D), T = h * w
        tokens = tokens + self.pos_embed.to(tokens.dtype)  # (N, T, D)
        for block in self.blocks:
            tokens = block(tokens, c)  # (N, T, D)
        tokens = self.final_layer(tokens, c)  # (N, T, p*p*C)
        return self.unpatchify(tokens)  # (N, C, H, W)


def init_linears_and_patches(net: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every linear layer (as in ViT), and the patch
    embedding ``net.x_embedder`` initialised like the (D, C*p*p) linear layer it is."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    w = net.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(net.x_embedder.bias)


def unpatchify(tokens: Tensor, patch_size: int, channels: int) -> Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), token k = i * w + j covering rows i*p.., cols j*p.."""
    n, T, _ = tokens.shape
    p, c = patch_size, channels
    h = w = int(math.isqrt(T))
    x = tokens.reshape(n, h, w, p, p, c)  # (N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(n, c, h * p, w * p)  # (N, C, H, W)


def with_teacher_weights(net: DiT, teacher: DiT, added: str) -> DiT:
    """``net`` (a DiT with one more conditioning embedder, ``added``) carrying ``teacher``'s weights;
    refuses a teacher whose weights do not fit it, or that leaves anything but ``added`` unset."""
    p = next(teacher.parameters())
    net.to(p.device, p.dtype)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(added)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(added) for k in missing):
        raise ValueError(f"teacher weights do not fit {type(net).__name__}: missing {missing}, unexpected {unexpected}")
    return net


def dit_shape(config: DiTConfig) -> dict:
    """The plain DiT fields of any DiT variant's config."""
    return {f.name: getattr(config, f.name) for f in fields(DiTConfig)}


register_kind("dit", DiTConfig, DiT)
