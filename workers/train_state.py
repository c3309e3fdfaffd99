"""What a training checkpoint holds, named in one place.

A checkpoint (:mod:`infra.checkpoints`: ``tensors.safetensors`` and ``state.json`` per step) of
the one training loop stores

    tensors   model.<param>              the raw weights (no DDP prefix)
              ema.<param>                the EMA weights (what a generator samples)
              extra.<module>.<param>     the objective's own modules (a consistency EMA target)
              opt.<index>.<name>         AdamW's moments, as flat tensors (no pickle)
              rng.cpu, rng.cuda          rank 0's RNG streams, as uint8
    state     :class:`LoopState`         step position in the data, curve, where it ran, timing

The worker writes and resumes from them (:mod:`workers.train_loop`); the driver reads the final
weights and curve back (:func:`workers.train.fit`). Both go through this module only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from infra.checkpoints import Checkpoint

MODEL, EMA, EXTRA, OPTIMIZER = "model.", "ema.", "extra.", "opt."
RNG_CPU, RNG_CUDA = "rng.cpu", "rng.cuda"


@dataclass
class LoopState:
    """Where the loop stands (``state.json``); ``step`` is the checkpoint's own step."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch already used: a resumed epoch skips them
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # the step this attempt started from (0: a fresh run)
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank
    threads: int = 0  # torch threads rank 0 ran
    timing: dict[str, float] = field(default_factory=dict)  # where rank 0's wall time went

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> LoopState:
        state = checkpoint.state
        return cls(
            step=checkpoint.step,
            epoch=int(state.get("epoch", 0)),
            position=int(state.get("position", 0)),
            curve=list(state.get("curve", [])),
            resumed_from=int(state.get("resumed_from", 0)),
            nodes=list(state.get("nodes", [])),
            threads=int(state.get("threads", 0)),
            timing=dict(state.get("timing", {})),
        )

    def to_json(self) -> dict[str, Any]:
        """What ``state.json`` holds (the step is the checkpoint's)."""
        return {k: v for k, v in asdict(self).items() if k != "step"}


def pack(model: nn.Module, ema: nn.Module, extra: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Every tensor a resumed run needs, under the names above (``model`` is the bare module)."""
    tensors = {**with_prefix(model.state_dict(), MODEL), **with_prefix(ema.state_dict(), EMA)}
    for name, module in extra.items():
        tensors.update(with_prefix(module.state_dict(), f"{EXTRA}{name}."))
    return {**tensors, **optimizer_tensors(optimizer), **rng_state_tensors()}


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    ema: nn.Module,
    extra: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load a checkpoint's weights, objective modules, optimizer and RNG state (rank 0's) in place."""
    tensors = checkpoint.tensors
    model.load_state_dict(strip(tensors, MODEL))
    ema.load_state_dict(strip(tensors, EMA))
    for name, module in extra.items():
        module.load_state_dict(strip(tensors, f"{EXTRA}{name}."))
    load_optimizer(optimizer, tensors)
    torch.set_rng_state(tensors[RNG_CPU])
    if RNG_CUDA in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[RNG_CUDA])


def weights(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(raw, EMA) state dicts of a checkpoint."""
    return strip(checkpoint.tensors, MODEL), strip(checkpoint.tensors, EMA)


def strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def with_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + name: value.detach().cpu().contiguous() for name, value in state.items()}


def rng_state_tensors() -> dict[str, Tensor]:
    """torch's CPU (and CUDA) RNG state as uint8 tensors, so it lives in safetensors."""
    states = {RNG_CPU: torch.get_rng_state()}
    if torch.cuda.is_available():
        states[RNG_CUDA] = torch.cuda.get_rng_state()
    return states


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's state as flat tensors (no pickle): ``opt.<param index>.<name>``."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{OPTIMIZER}{index}.{name}"] = tensor.detach().cpu().contiguous()
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in strip(tensors, OPTIMIZER).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
