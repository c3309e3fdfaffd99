"""Rebuild a model from a plain, JSON-able spec, so weights can live in safetensors + JSON.

    spec = model_spec(model)   # {"kind": "dit", "config": {...the config dataclass's fields...}}
    model = build_model(spec)  # same architecture, fresh weights; then load_state_dict

A kind pairs a frozen config dataclass with a module class whose constructor takes that
config as its only argument. Each model module registers its own kind when imported
(``models.dit`` registers "dit", ``models.unet`` "unet"); the kinds fewstep ships are imported on first use by
:func:`build_model`, so loading a stored spec needs no import order. Modules built here carry
their config as ``.config``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

_KINDS: dict[str, tuple[type, type[nn.Module]]] = {}
# The module that registers each kind fewstep ships (imported on first use, see build_model).
BUILTIN_KINDS = {
    "dit": "models.dit",
    "unet": "models.unet",
    "vae": "models.vae",
    "classifier": "models.classifier",
    "encoder": "models.encoder",
    "flowmap_dit": "models.flowmap_dit",
    "guided_dit": "models.guided_dit",
    "lora_dit": "models.lora",
    "mmdit": "models.mmdit",
}


def register_kind(name: str, config_cls: type, module_cls: type[nn.Module]) -> None:
    """Make ``build_model({"kind": name, ...})`` build ``module_cls(config_cls(**config))``.

    Registering the same pair again is a no-op; a different pair under a taken name is an error.
    """
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise ValueError(f"config_cls for kind {name!r} must be a dataclass type, got {config_cls!r}")
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise ValueError(f"module_cls for kind {name!r} must be an nn.Module subclass, got {module_cls!r}")
    existing = _KINDS.get(name)
    if existing is not None and existing != (config_cls, module_cls):
        raise ValueError(f"model kind {name!r} is already registered to {existing[1].__name__}; pick another name")
    _KINDS[name] = (config_cls, module_cls)


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def _kind_of(model: nn.Module) -> str:
    # The exact class first, then the most recently registered base class.
    for name, (_, module_cls) in _KINDS.items():
        if type(model) is module_cls:
            return name
    for name, (_, module_cls) in reversed(list(_KINDS.items())):
        if isinstance(model, module_cls):
            return name
    raise ValueError(
        f"{type(model).__name__} is not a registered model kind (registered: {registered_kinds()}); "
        "call register_kind first, and pass the bare module, not a DDP/compile wrapper"
    )


def model_spec(model: nn.Module) -> dict[str, Any]:
    """{"kind": ..., "config": {field: value}} describing ``model``'s architecture (not its weights)."""
    kind = _kind_of(model)
    config_cls = _KINDS[kind][0]
    config = getattr(model, "config", None)
    if not isinstance(config, config_cls):
        raise ValueError(
            f"{type(model).__name__}.config is {config!r}, expected a {config_cls.__name__}; "
            "modules of a registered kind must keep their config as .config"
        )
    return {"kind": kind, "config": dataclasses.asdict(config)}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised module of the architecture ``spec`` describes.

    Lists in the config (what JSON makes of tuples) are turned back into tuples.
    """
    if not isinstance(spec, dict) or set(spec) != {"kind", "config"}:
        got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f'a model spec is {{"kind": ..., "config": {{...}}}}, got {got}')
    kind, raw = spec["kind"], spec["config"]
    if kind not in _KINDS and kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[kind])  # registers it
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; registered kinds are {registered_kinds()}")
    config_cls, module_cls = _KINDS[kind]
    if not isinstance(raw, dict):
        raise ValueError(f"spec config for kind {kind!r} must be a dict, got {type(raw).__name__}")

    raw = without_retired(config_cls, raw, kind)
    field_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(raw) - field_names)
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} field(s) {unknown} for kind {kind!r}; "
            f"valid fields are {sorted(field_names)}"
        )
    required = {
        f.name
        for f in dataclasses.fields(config_cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{config_cls.__name__} field(s) {missing} are required for kind {kind!r}")

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    config = config_cls(**values)
    module = module_cls(config)
    if getattr(module, "config", None) is None:
        module.config = config
    return module


def without_retired(config_cls: type, raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """A stored config without the fields its class has retired (``RETIRED``: name -> the one value
    the current module still builds), so specs written by older versions keep loading."""
    retired = getattr(config_cls, "RETIRED", {})
    for name, value in raw.items():
        if name in retired and value != retired[name]:
            raise ValueError(
                f"this {kind!r} spec sets {name}={value!r}, which {config_cls.__name__} no longer has; "
                f"only {retired[name]!r} (the value it now builds) can be loaded"
            )
    return {name: value for name, value in raw.items() if name not in retired}
