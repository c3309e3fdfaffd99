"""Weights as safetensors plus a JSON spec that rebuilds the module: nothing is ever unpickled.

    name.safetensors   the state dict, with wrapper prefixes ("module.", "_orig_mod.") removed
    name.json          {"kind": "dit" | "vae" | ..., "config": {...}}  -> models.registry.build_model

Only :func:`build_and_load` touches ``models/``, and lazily, so this module works (and is
tested) on plain tensors and dicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from infra.errors import IntegrityError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
SPEC_METADATA_KEY = "fewstep.model_spec"


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop "module." / "_orig_mod." while *every* key starts with one (a wrapper wraps the whole model)."""
    state = dict(state)
    changed = True
    while state and changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def tensors_for_save(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is cloned
    (safetensors refuses shared storage; ``load_state_dict`` restores ties from the module)."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}; only torch.Tensor values can be stored")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict ready for safetensors, with wrapper prefixes removed."""
    return tensors_for_save(strip_wrapper_prefixes(model.state_dict()))


def tensors_to_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None) -> bytes:
    """safetensors bytes; ``metadata`` values that are not strings are stored as JSON."""
    header = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    return safetensors_save(tensors_for_save(tensors), metadata=header or None)


def tensors_from_bytes(data: bytes, where: str = "safetensors data") -> dict[str, Tensor]:
    try:
        return safetensors_load(data)
    except Exception as error:  # noqa: BLE001 - the library raises several kinds
        raise IntegrityError(
            f"{where} is not a readable safetensors file ({error}); re-run the stage that wrote it"
        ) from None


def check_spec(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or "kind" not in spec or "config" not in spec:
        raise ValueError(
            f'a model spec is {{"kind": ..., "config": {{...}}}} (see models.registry.model_spec), got {spec!r:.200}'
        )
    json.dumps(spec)  # must be JSON-able as given
    return spec


def build_and_load(
    spec: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    where: str,
    build: Callable[[dict], nn.Module] | None = None,
) -> nn.Module:
    """A module built from ``spec`` (by ``models.registry.build_model`` unless ``build`` is given)
    with ``tensors`` loaded strictly; a mismatch names the missing and unexpected keys."""
    if build is None:
        from models.registry import build_model as build
    model = build(dict(spec))
    result = model.load_state_dict(dict(tensors), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise IntegrityError(
            f"{where} does not fit its spec {spec.get('kind')!r}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; the weights and the JSON spec were written by different models"
        )
    return model
