"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al., 2024), text to image.

The network predicts the straight-path velocity ``v(x_t, t, y)`` as the DiT does
(models/conventions.py), with ``y`` a caption: (N, L) word ids of models/text.py, padded with
PAD, the all-padding row being the empty prompt (classifier-free guidance's null condition).

Two streams of tokens, each with its own weights, meet in one attention at every layer:

    text  y (N, L) --TextEncoder--> (N, L, D)          its own small transformer, trained with the generator
    image x (N, C, H, W) --patchify--> (N, T, D) + fixed 2-D sin-cos positions
    c = t_embed(t) + pooled_embed(mean of the caption's tokens)            (N, D)

    per block, for each stream s in (text, image), its own AdaLN-Zero modulation from c:
        h_s = modulate(LN(tokens_s), shift1_s, scale1_s);  q_s, k_s, v_s = qkv_s(h_s)
        [o_text; o_image] = softmax([q_text; q_image] [k_text; k_image]^T / sqrt(d_h)) [v_text; v_image]
                            (padded caption positions masked out as keys)
        tokens_s += gate1_s * proj_s(o_s)
        tokens_s += gate2_s * mlp_s(modulate(LN(tokens_s), shift2_s, scale2_s))

    FinalLayer(image tokens, c) --unpatchify--> v (N, C, H, W)

As in the DiT, every modulation and the final layer start at zero: a fresh MMDiT outputs exactly 0
and each block starts as the identity on both streams. The caption's pooled vector is the mean of
its encoded non-padding tokens (zero for the empty prompt), the stand-in for SD3's CLIP pooled
embedding; SD3's three pretrained text encoders are replaced by one trained here, since no weights
can be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.conventions import VelocityNet
from models.dit import (
    FinalLayer,
    Mlp,
    TimestepEmbedder,
    init_linears_and_patches,
    modulate,
    sincos_1d,
    sincos_2d,
    unpatchify,
)
from models.registry import register_kind
from models.text import PAD


@dataclass(frozen=True, kw_only=True)
class MMDiTConfig:
    """Shape of an MMDiT: the image stream's (as a DiT's) and the caption's vocabulary, length and encoder depth."""

    input_size: int = 16  # latent height == width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    vocab_size: int  # the tokenizer's, padding and unknown included
    max_text_length: int = 32
    text_depth: int = 2  # layers of the caption's own encoder before the joint blocks
    num_classes: int = 0  # captions, not class ids: no class labels

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads} and by 4 (positions)"
            )
        if self.vocab_size < 2 or self.max_text_length < 1 or self.depth < 0 or self.text_depth < 0:
            raise ValueError(f"need vocab_size >= 2, max_text_length >= 1, depths >= 0; got {self}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size


MMDIT_PRESETS: dict[str, dict] = {
    "MMDiT-T/2": dict(hidden_size=64, depth=2, num_heads=4, patch_size=2, text_depth=1),
    "MMDiT-XXS/2": dict(hidden_size=128, depth=3, num_heads=4, patch_size=2, text_depth=1),
}


def mmdit_config(preset: str, **overrides) -> MMDiTConfig:
    if preset not in MMDIT_PRESETS:
        raise ValueError(f"unknown MMDiT preset {preset!r}; choose one of {sorted(MMDIT_PRESETS)}")
    return MMDiTConfig(**{**MMDIT_PRESETS[preset], **overrides})


class TextEncoder(nn.Module):
    """Word ids (N, L) -> token features (N, L, D) and the pooled caption (N, D).

    Word embeddings plus fixed sin-cos positions, then ``depth`` pre-norm transformer layers that
    attend over the caption's own words (padding masked out as keys)."""

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.register_buffer(
            "positions", sincos_1d(width, torch.arange(max_length)).float()[None], persistent=False
        )  # (1, L, D)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (N, L, D), pooled (N, D), keep (N, L) bool: True at the caption's words)."""
        keep = ids != PAD  # (N, L)
        h = self.embedding(ids) + self.positions[:, : ids.shape[1]]
        # A row of only padding (the empty prompt) masks nothing here, so no softmax sees all -inf;
        # its tokens are still masked out of the joint attention and of the pooled mean.
        ignore = ~keep & keep.any(dim=1, keepdim=True)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=ignore)
        h = self.norm(h)
        weights = keep.to(h.dtype)[..., None]  # (N, L, 1)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (N, D); zero for the empty prompt
        return h, pooled, keep


class StreamProjections(nn.Module):
    """One stream's own weights in a joint block: its modulation, qkv, output projection and MLP."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))


class JointBlock(nn.Module):
    """An MMDiT block: both streams modulated by c, one attention over their concatenated tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.text = StreamProjections(hidden_size, mlp_ratio)
        self.image = StreamProjections(hidden_size, mlp_ratio)

    def heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, T, 3D) -> q, k, v, each (N, H, T, D/H)."""
        n, T, three_d = qkv.shape
        q, k, v = qkv.reshape(n, T, 3, self.num_heads, three_d // (3 * self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # 3 x (N, H, T, d/H)

    def forward(self, text: Tensor, image: Tensor, c: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        L = text.shape[1]
        mods = {}
        qkv = []
        for name, tokens in (("text", text), ("image", image)):
            stream = getattr(self, name)
            mods[name] = stream.adaLN_modulation(c).chunk(6, dim=1)  # six (N, D)
            shift, scale = mods[name][0], mods[name][1]
            qkv.append(self.heads(stream.qkv(modulate(stream.norm1(tokens), shift, scale))))
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(*qkv))  # (N, H, L + T, d/H)
        # Keys: the caption's words and every image token; padding is never attended to.
        attend = torch.cat([keep, keep.new_ones(image.shape[:2])], dim=1)[:, None, None, :]  # (N, 1, 1, L + T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # (N, H, L + T, d/H)
        out = out.transpose(1, 2).flatten(2)  # (N, L + T, D)
        results = []
        for name, tokens, part in (("text", text, out[:, :L]), ("image", image, out[:, L:])):
            stream = getattr(self, name)
            _, _, gate1, shift2, scale2, gate2 = mods[name]
            tokens = tokens + gate1[:, None, :] * stream.proj(part)
            tokens = tokens + gate2[:, None, :] * stream.mlp(modulate(stream.norm2(tokens), shift2, scale2))
            results.append(tokens)
        return results[0], results[1]


class MMDiT(VelocityNet):
    """Velocity network ``v = model(x, t, y)`` for latents (N, C, H, W) and captions ``y`` (N, L) of word ids."""

    def __init__(self, config: MMDiTConfig):
        super().__init__(config)
        d = config.hidden_size
        self.out_channels, self.patch_size = config.in_channels, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, d, config.patch_size, config.patch_size)
        self.register_buffer("pos_embed", sincos_2d(d, config.grid_size).float()[None], persistent=False)
        self.t_embedder = TimestepEmbedder(d)
        self.text_encoder = TextEncoder(
            config.vocab_size, config.max_text_length, d, config.text_depth, config.num_heads
        )
        self.pooled_embedder = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(JointBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The DiT's initialisation, AdaLN-Zero on both streams of every block and on the final layer."""
        init_linears_and_patches(self)
        nn.init.normal_(self.text_encoder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for stream in (block.text, block.image):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_like(self, y: Tensor) -> Tensor:
        """The empty prompt for every caption of ``y``: all PAD, the null condition of classifier-free
        guidance (models.conventions.null_like)."""
        return torch.full_like(y, PAD)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """v(x, t, y): x (N, C, H, W), t (N,) in [0, 1], y (N, L) word ids (L <= max_text_length) -> (N, C, H, W)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"MMDiT expects x of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] > cfg.max_text_length:
            raise ValueError(
                f"MMDiT takes t (N,) and captions y (N, L <= {cfg.max_text_length}) of word ids for N={x.shape[0]}; "
                f"got t {tuple(t.shape)}, y {tuple(y.shape)}"
            )
        text, pooled, keep = self.text_encoder(y)  # (N, L, D), (N, D), (N, L)
        image = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)  # (N, D)
        for block in self.blocks:
            text, image = block(text, image, c, keep)
        return unpatchify(self.final_layer(image, c), self.patch_size, self.out_channels)  # (N, C, H, W)


register_kind("mmdit", MMDiTConfig, MMDiT)
