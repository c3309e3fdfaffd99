"""Custom Ray resources in a section's ``resources``: validated, kept out of stage keys, and handed to
every engine (Ray Train's worker bundle, Ray Data / task / Serve options)."""

from __future__ import annotations

import pytest

from infra.config import ConfigError, GeneratorConfig, Resources, load_config
from workers.runtime import remote_options, worker_resources


def test_custom_resources_are_validated_and_left_out_of_stage_keys():
    pinned = load_config("quick", overrides={"base": {"resources": {"workers": 2, "custom": {"trainer": 1}}}})
    assert pinned.base.resources.custom == {"trainer": 1.0}
    assert pinned.base.keyed() == load_config("quick").base.keyed()  # where it runs is not what it computes
    assert hash(pinned.base) != hash(load_config("quick").base)  # still hashable, and they differ
    for bad, message in [
        ({"CPU": 1}, "set resources.cpus"),
        ({"GPU": 1}, "set resources.gpus"),
        ({"memory": 1}, "reserved by Ray"),
        ({"trainer": 0}, "must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("quick", overrides={"latents": {"resources": {"custom": bad}}})


def test_every_engine_gets_the_custom_resources():
    resources = Resources(workers=2, cpus=2, gpus=0.5, custom={"trainer": 1})
    assert worker_resources(resources) == {"CPU": 2.0, "GPU": 0.5, "trainer": 1.0}
    assert remote_options(resources) == {"num_cpus": 2.0, "num_gpus": 0.5, "resources": {"trainer": 1.0}}
    assert remote_options(Resources()) == {"num_cpus": 1.0, "num_gpus": None}  # no GPU: Ray's default
    assert worker_resources(Resources()) == {"CPU": 1.0}

    from infra.config import ServeConfig
    from workers.serving.app import deployment_options

    options = deployment_options(ServeConfig(resources=resources), None, 64)
    assert options["ray_actor_options"]["resources"] == {"trainer": 1.0}
    assert GeneratorConfig(resources=resources, batch_size=64).resources.custom == {"trainer": 1.0}
