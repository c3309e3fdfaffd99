"""Low-rank adapters (LoRA, Hu et al. 2021) on a DiT: the frozen base plus a small trained update.

A target linear layer y = W x + b becomes

    y = W x + b + (alpha / r) B A x,      A (r, in), B (out, r),  r << min(in, out)

with W, b frozen and only A, B trained. B starts at zero, so a fresh adapter leaves the network
exactly as it was; A starts random (Kaiming-uniform, as LoRA's reference code) so B's gradient is
not zero. Merging folds the update into the weight, W' = W + (alpha / r) B A, for a plain network
with no extra cost per step (:func:`merge_lora`).

LCM-LoRA (Luo et al. 2023) trains such an adapter with the consistency-distillation objective on a
frozen flow or diffusion base: the adapter turns the base into a few-step student, is a small file
of its own, and can be switched off to get the base back. :class:`LoRADiT` is that network: a
:class:`~models.dit.DiT` whose transformer projections (attention qkv and out, the MLP's two
layers: ``targets``) carry adapters, everything else frozen. ``adapters_enabled`` switches them
on and off per call, so one network in memory serves the teacher and the student.

Its state dict is the DiT's, plus ``<layer>.lora_down`` / ``<layer>.lora_up`` per adapted layer:
a base DiT's weights load into it as they are (:func:`lora_from_velocity`), and
:func:`adapter_state` is the adapter alone, what the store keeps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dit import DiT, DiTConfig, dit_shape
from models.registry import register_kind

# The linear layers of each DiT block an adapter goes on (names inside a block).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ADAPTER_KEYS = ("lora_down", "lora_up")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRADiTConfig(DiTConfig):
    """A DiT's shape and its adapters': rank r, scale alpha (None: alpha = r, a scale of 1), and the
    block linears they go on."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = BLOCK_LINEARS

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "targets", tuple(self.targets))  # a JSON spec gives a list
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(BLOCK_LINEARS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets must be a non-empty subset of {list(BLOCK_LINEARS)}, got {list(self.targets)}"
            )

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale (x A^T) B^T; W, b as an ``nn.Linear``'s (same state-dict names)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale
        self.adapter_enabled = True
        self.lora_down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank))  # B
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """A Kaiming-uniform, B zero: the layer is its base linear again."""
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up)

    @classmethod
    def wrapping(cls, linear: nn.Linear, rank: int, scale: float) -> LoRALinear:
        layer = cls(linear.in_features, linear.out_features, rank, scale, bias=linear.bias is not None)
        layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def delta_weight(self) -> Tensor:
        """scale B A, (out, in): what merging adds to W."""
        return self.scale * self.lora_up @ self.lora_down

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.adapter_enabled:
            out = out + self.scale * F.linear(F.linear(x, self.lora_down), self.lora_up)
        return out


class LoRADiT(DiT):
    """A DiT with adapters on its blocks' projections; only the adapters train."""

    def __init__(self, config: LoRADiTConfig):
        super().__init__(config)
        for block in self.blocks:
            for target in config.targets:
                parent_name, _, name = target.rpartition(".")
                parent = block.get_submodule(parent_name)
                setattr(parent, name, LoRALinear.wrapping(getattr(parent, name), config.rank, config.scale))
        for name, param in self.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_KEYS)

    def adapters(self) -> Iterator[LoRALinear]:
        return (m for m in self.modules() if isinstance(m, LoRALinear))

    @contextmanager
    def adapters_enabled(self, enabled: bool) -> Iterator[LoRADiT]:
        """Within the block, the adapters on (the student) or off (the base): one network, two models."""
        layers = list(self.adapters())
        before = [layer.adapter_enabled for layer in layers]
        for layer in layers:
            layer.adapter_enabled = enabled
        try:
            yield self
        finally:
            for layer, state in zip(layers, before):
                layer.adapter_enabled = state


def adapter_state(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter tensors alone (``...lora_down``, ``...lora_up``), from a LoRA network or its state dict."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().cpu() for k, v in state.items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def lora_from_velocity(
    base: DiT, rank: int = 8, alpha: float | None = None, targets: tuple[str, ...] = BLOCK_LINEARS
) -> LoRADiT:
    """A LoRA network over ``base``'s weights with fresh adapters: equal to ``base`` at init."""
    if type(base) is not DiT:
        raise ValueError(f"a LoRA adapter goes on a DiT velocity network, got {type(base).__name__}")
    p = next(base.parameters())
    net = LoRADiT(LoRADiTConfig(**dit_shape(base.config), rank=rank, alpha=alpha, targets=targets))
    net.to(p.device, p.dtype)
    missing, unexpected = net.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(k.rsplit(".", 1)[-1] not in ADAPTER_KEYS for k in missing):
        raise ValueError(f"base weights do not fit the LoRA network: missing {missing}, unexpected {unexpected}")
    return net


def with_adapter(base: DiT, config: LoRADiTConfig, adapter: Mapping[str, Tensor]) -> LoRADiT:
    """``base`` with a stored adapter (its :func:`adapter_state`) applied; the adapter must fit exactly."""
    if dit_shape(base.config) != dit_shape(config):
        raise ValueError(
            "the adapter was trained on a base of another shape: "
            f"base {dit_shape(base.config)}, adapter's {dit_shape(config)}"
        )
    net = lora_from_velocity(base, config.rank, config.alpha, config.targets)
    expected = set(adapter_state(net))
    if set(adapter) != expected:
        missing, extra = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
        raise ValueError(f"the adapter does not fit its config: missing {missing[:4]}, unexpected {extra[:4]}")
    net.load_state_dict(dict(adapter), strict=False)
    return net


def merge_lora(net: LoRADiT) -> DiT:
    """A plain DiT whose weights are W + scale B A: the same outputs as ``net`` with adapters on."""
    merged = DiT(DiTConfig(**dit_shape(net.config)))
    p = next(net.parameters())
    merged.to(p.device, p.dtype)
    state = {k: v for k, v in net.state_dict().items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    for name, module in net.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.weight.detach() + module.delta_weight().detach()
    merged.load_state_dict(state)
    return merged.train(net.training)


register_kind("lora_dit", LoRADiTConfig, LoRADiT)
