"""The presets: named overrides of the config sections' defaults (infra/config.py), as plain data.

``fewstep run --preset NAME`` starts from one of these, then merges the user's file and flags over it
(:func:`infra.config.load_config`). Each preset says what it is for and what budget it was sized to.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Overrides of the sections' defaults. "default" is the quality preset (about 10 min on
# 2 CPU cores); "quick" runs the whole chain in a few minutes, for trying it and for tests.
LOCAL = {"resources": {"workers": 0}}  # a training stage in Ray Train's local mode
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"probe": {"n": 500}},
    # Its training stages run in Ray Train's local mode (workers: 0): seconds of training each,
    # where starting and stopping a worker group would cost about 10 s per stage.
    "quick": {
        "ingest": {"limit": 600},
        "vae": {"steps": 150, "base_channels": 16, "batch_size": 64, "warmup_steps": 15, **LOCAL},
        "base": {"steps": 150, "batch_size": 64, "checkpoint_every": 50, "warmup_steps": 10, **LOCAL},
        # as base; still off
        "ddpm": {"steps": 150, "batch_size": 64, "checkpoint_every": 50, "warmup_steps": 10, **LOCAL},
        "pairs": {"pairs": 256, "steps": 8},
        "reflow": {"rounds": 1, "steps": 80, "batch_size": 64, "checkpoint_every": 40, **LOCAL},
        "consistency": {"intervals": 8, "steps": 80, "batch_size": 64, "checkpoint_every": 40, **LOCAL},
        "flowmap": {"enabled": True, "steps": 40, "batch_size": 32, "checkpoint_every": 20, **LOCAL},
        "features": {"steps": 150, **LOCAL},
        "evaluate": {
            "n": 200,
            "flow_steps": [1, 2, 4, 8],
            "flow_solvers": ["euler"],
            "consistency_steps": [1, 2],
            "flowmap_steps": [1, 2],
            "guidance": [1, 2],
        },
        "probe": {"n": 200, "student_steps": 2, "guidance": [1, 2]},  # the student's largest evaluated step count
    },
    # The RGB quality benchmark: procedural 32x32 shapes, intervals on every number, sized to finish
    # in <= 60 min on 2 CPU cores. Most of the budget goes to the base model, where quality comes from
    # (BENCHMARKS.md, "A teacher that learns"): a 1.28M DiT at batch 64 and lr 2e-3 with both cores.
    # The DDPM baseline and the second reflow round are in "shapes-full".
    "shapes": {
        "ingest": {"source": "shapes", "shapes_count": 12000, "image_size": 32, "channels": 3, "test_fraction": 0.15},
        "vae": {"steps": 800, "base_channels": 16, "batch_size": 64, "lr": 2e-3},
        "base": {
            "model": "DiT-XXS/2",
            "steps": 16000,
            "batch_size": 64,
            "lr": 2e-3,
            "warmup_steps": 200,
            "checkpoint_every": 1000,
            "resources": {"cpus": 2},
        },
        "pairs": {"pairs": 4096, "steps": 16, "solver": "heun", "resources": {"cpus": 2}},
        "reflow": {"rounds": 1, "steps": 1500, "batch_size": 128, "checkpoint_every": 500, "resources": {"cpus": 2}},
        "consistency": {
            "steps": 1000,
            "batch_size": 64,
            "intervals": 18,
            "checkpoint_every": 500,
            "resources": {"cpus": 2},
        },
        "flowmap": {
            "enabled": True,
            "steps": 1000,
            "batch_size": 64,
            "checkpoint_every": 500,
            "resources": {"cpus": 2},
        },
        # Issue 25's two production tricks: the base's guidance in one pass, and an LCM-LoRA adapter.
        "guidance_distill": {
            "enabled": True,
            "steps": 1000,
            "batch_size": 64,
            "checkpoint_every": 500,
            "resources": {"cpus": 2},
        },
        "lora": {
            "enabled": True,
            "rank": 16,
            "steps": 1000,
            "batch_size": 64,
            "intervals": 18,
            "checkpoint_every": 500,
            "resources": {"cpus": 2},
        },
        "features": {"steps": 800},
        "evaluate": {
            "n": 2000,
            "flow_steps": [1, 2, 4, 8, 16],
            "flow_solvers": ["euler"],
            "consistency_steps": [1, 2, 4],
            "flowmap_steps": [1, 2, 4, 8],
            "guidance": [1, 2, 3],
            "resources": {"workers": 2},
        },
        "probe": {"n": 500, "student_steps": 4, "guidance": [1, 2, 3], "resources": {"cpus": 2}},
    },
}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# A second labelled RGB set (digits drawn as strokes on gradient and striped backgrounds) under
# exactly the shapes preset: built from it, so it is never tuned on its own, and a change to
# the shapes preset carries over.
PRESETS["glyphs"] = deep_merge(PRESETS["shapes"], {"ingest": {"source": "glyphs"}})
# The shapes benchmark with every method: a second reflow round and the DDPM baseline (about
# 30 min more on 2 CPU cores), scored up to 250 of the DDPM's T = 1000 steps.
PRESETS["shapes-full"] = deep_merge(
    PRESETS["shapes"],
    {
        "reflow": {"rounds": 2},
        "ddpm": {"enabled": True, **PRESETS["shapes"]["base"]},  # the baseline gets the base model's budget
        "evaluate": {"diffusion_steps": [10, 50, 250]},
    },
)
