"""The guidance scale a stage samples its teacher at, as the config names it.

``pairs.guidance`` and ``consistency.guidance`` may be ``None``: "the base model's best
guidance". The flow resolves that to a number before it calls the stage
(:func:`resolve_guidance`), so the stage key holds the scale actually used; a stage handed
``None`` refuses it (:func:`require_guidance`) rather than guess.
"""

from __future__ import annotations

import math

from infra.config import MAX_GUIDANCE, ConfigError


def resolve_guidance(value: float | None, best: float) -> float:
    """``value`` where the config names one, else ``best`` (the base model's best scale)."""
    chosen = best if value is None else value
    if not (math.isfinite(chosen) and 0 <= chosen <= MAX_GUIDANCE):
        raise ConfigError(f"guidance {chosen!r} is not a scale in 0..{MAX_GUIDANCE:g}; name one in the config")
    return float(chosen)


def require_guidance(section: str, value: float | None) -> float:
    """The resolved scale of ``section`` (``pairs``, ``consistency``); None is a ConfigError."""
    if value is None:
        raise ConfigError(
            f"{section}.guidance is None (the base model's best) and was not resolved before the stage ran; "
            f"pass a number: the pipeline resolves it with resolve_guidance, or set {section}.guidance in the config"
        )
    return float(value)
