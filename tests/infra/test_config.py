"""The configuration refuses what it cannot run: non-finite numbers, coerced types, absurd sizes,
repeated YAML keys, unknown models and missing files, each naming the field before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.config import (
    MAX_EVAL_IMAGES,
    MAX_STEPS,
    ConfigError,
    EvaluateConfig,
    GeneratorConfig,
    IngestConfig,
    PipelineConfig,
    load_config,
    validate_config,
)


def load_yaml(tmp_path: Path, text: str) -> PipelineConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config("quick", path)


@pytest.mark.parametrize(
    "text, field",
    [
        ("base:\n  lr: .inf\n", "base.lr = inf"),
        ("base:\n  grad_clip: .inf\n", "base.grad_clip = inf"),
        ("pairs:\n  guidance: .inf\n", "pairs.guidance = inf"),
        ("consistency:\n  guidance: -.inf\n", "consistency.guidance = -inf"),
        ("evaluate:\n  guidance: [1, .nan]\n", "evaluate.guidance.1 = nan"),
        ("vae:\n  beta: .nan\n", "vae.beta = nan"),
        ("serve:\n  max_guidance: .inf\n", "serve.max_guidance = inf"),
        ("base:\n  resources: {cpus: .inf}\n", "base.resources.cpus = inf"),
    ],
)
def test_non_finite_floats_are_refused_in_every_section(tmp_path, text, field):
    with pytest.raises(ConfigError, match="finite number") as error:
        load_yaml(tmp_path, text)
    assert field in str(error.value)


@pytest.mark.parametrize(
    "text, field",
    [
        ("base:\n  steps: '100'\n", "base.steps = '100'"),
        ("base:\n  steps: true\n", "base.steps = True"),
        ("base:\n  steps: 100.0\n", "base.steps = 100.0"),
        ("ingest:\n  channels: true\n", "ingest.channels = True"),
        ("base:\n  cache_data: 1\n", "base.cache_data = 1"),
        ("ingest:\n  source: 7\n", "ingest.source = 7"),
        ("evaluate:\n  flow_steps: [1, '2']\n", "evaluate.flow_steps.1 = '2'"),
        ("base:\n  resources: {workers: '2'}\n", "base.resources.workers = '2'"),
    ],
)
def test_no_type_coercion(tmp_path, text, field):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, text)
    assert field in str(error.value)


def test_integers_still_fill_float_fields_and_lists_fill_tuples(tmp_path):
    config = load_yaml(tmp_path, "base:\n  lr: 1\n  grad_clip: 2\nevaluate:\n  flow_steps: [1, 3]\n")
    assert config.base.lr == 1.0 and isinstance(config.base.lr, float) and config.base.grad_clip == 2.0
    assert config.evaluate.flow_steps == (1, 3)
    # What the flow receives (model_dump(mode="json")) validates back to the same config.
    assert validate_config(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    "text, field",
    [
        ("base:\n  steps: 1000000000000\n", "base.steps"),
        ("base:\n  steps: 1.0e+12\n", "base.steps"),
        ("evaluate:\n  n: 1000000000\n", "evaluate.n"),
        ("pairs:\n  pairs: 100000000000\n", "pairs.pairs"),
        ("pairs:\n  steps: 100000\n", "pairs.steps"),
        ("ingest:\n  image_size: 65536\n", "ingest.image_size"),
        ("base:\n  resources: {workers: 100000}\n", "base.resources.workers"),
        ("base:\n  batch_size: 100000000\n", "base.batch_size"),
        ("evaluate:\n  flow_steps: [1, 100000]\n", "evaluate"),
        ("consistency:\n  intervals: 1000000\n", "consistency.intervals"),
        ("base:\n  lr: 10\n", "base.lr"),
        ("base:\n  seed: -1\n", "base.seed"),
        ("base:\n  seed: 99999999999\n", "base.seed"),
    ],
)
def test_sizes_have_upper_bounds(tmp_path, text, field):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, text)
    assert field in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("evaluate:\n  guidance: []\n", "at least one guidance scale"),
        ("evaluate:\n  guidance: [1, 2, 1]\n", "guidance scales [1.0] are listed twice"),
        ("evaluate:\n  guidance: [1, -0.5]\n", "must be in 0..100, got [-0.5]"),
        ("evaluate:\n  guidance: [2, 101]\n", "must be in 0..100, got [101.0]"),
        ("evaluate:\n  guidance: ['2']\n", "evaluate.guidance.0"),
        ("pairs:\n  guidance: -1\n", "pairs.guidance"),
    ],
)
def test_guidance_scales_are_refused_with_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match="guidance") as error:
        load_yaml(tmp_path, text)
    assert message in str(error.value)


def test_guidance_scales_default_to_a_small_set_and_a_single_scale_is_a_list_of_one(tmp_path):
    assert EvaluateConfig().guidance == (1.0, 2.0, 4.0)
    assert load_yaml(tmp_path, "evaluate:\n  guidance: 3\n").evaluate.guidance == (3.0,)
    assert load_yaml(tmp_path, "evaluate:\n  guidance: [0, 1.5]\n").evaluate.guidance == (0.0, 1.5)
    # pairs and consistency: None until the flow resolves the base model's best; a number is kept.
    default = PipelineConfig()
    assert default.pairs.guidance is None and default.consistency.guidance is None
    assert load_yaml(tmp_path, "pairs:\n  guidance: 1.5\n").pairs.guidance == 1.5


def test_bounds_leave_room_for_real_runs():
    assert GeneratorConfig(steps=MAX_STEPS).steps == MAX_STEPS
    assert EvaluateConfig(n=50_000).n == 50_000 <= MAX_EVAL_IMAGES
    assert IngestConfig(image_size=1024, limit=10**8).image_size == 1024


def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, "base:\n  steps: 10\n  lr: 0.001\n  steps: 20\n")
    message = str(error.value)
    assert "'steps'" in message and "lines 2 and 4" in message and "\n" not in message
    with pytest.raises(ConfigError, match="key 'base' appears twice"):
        load_yaml(tmp_path, "base: {steps: 10}\nvae: {steps: 5}\nbase: {lr: 0.01}\n")
    # The same key in two sections is not a duplicate, and a merge key may be overridden.
    config = load_yaml(tmp_path, "base:\n  steps: 10\nreflow:\n  steps: 20\n")
    assert (config.base.steps, config.reflow.steps) == (10, 20)
    config = load_yaml(tmp_path, "base: &b {steps: 10, lr: 0.01}\nreflow:\n  <<: *b\n  steps: 30\n")
    assert (config.reflow.steps, config.reflow.lr) == (30, 0.01)


def test_unknown_model_and_missing_files_are_refused_when_loading(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, "base:\n  model: DiT-ZZZ/2\n")
    assert "base.model = 'DiT-ZZZ/2'" in str(error.value) and "DiT-T/2" in str(error.value)
    with pytest.raises(ConfigError, match="ddpm.model = 'DiT-Q'"):
        load_yaml(tmp_path, "ddpm:\n  model: DiT-Q\n")
    with pytest.raises(ConfigError, match=r"evaluate.extractor = '.*missing.pt' is not a local file"):
        load_yaml(tmp_path, f"evaluate:\n  extractor: {tmp_path / 'missing.pt'}\n")
    with pytest.raises(ConfigError, match="vae.pretrained = .* is not a local folder"):
        load_yaml(tmp_path, f"vae:\n  pretrained: {tmp_path / 'no-vae'}\n")
    (tmp_path / "features.pt").write_bytes(b"x")
    assert load_yaml(tmp_path, f"evaluate:\n  extractor: {tmp_path / 'features.pt'}\n").evaluate.extractor
    # The flow's own entry point checks the same (a scheduled run gets a dict, not a file).
    with pytest.raises(ConfigError, match="evaluate.extractor"):
        validate_config({"evaluate": {"extractor": str(tmp_path / "gone.pt")}})


def test_a_rule_across_sections_names_its_fields_without_dumping_the_config(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, "consistency:\n  intervals: 4\nevaluate:\n  consistency_steps: [8]\n")
    message = str(error.value)
    assert "consistency_steps [8]" in message and "intervals=4" in message
    assert "'ingest'" not in message and len(message.splitlines()) == 1, message  # not the whole config


def test_the_glyphs_preset_is_the_shapes_preset_on_another_source():
    """Never tuned on its own: every field but the source equals the shapes preset's."""
    shapes, glyphs = load_config("shapes"), load_config("glyphs")
    assert shapes.ingest.source == "shapes" and glyphs.ingest.source == "glyphs"
    assert glyphs.model_copy(update={"ingest": glyphs.ingest.model_copy(update={"source": "shapes"})}) == shapes
    assert glyphs.base == shapes.base and glyphs.evaluate == shapes.evaluate  # (spelled out)


# What only decides whether, how often or on what inputs the flow runs a stage: (section, change).
NOT_AN_OUTPUT = [
    ("reflow", {"rounds": 2}),  # round k's key holds k (run_reflow), not how many rounds follow it
    ("ddpm", {"enabled": True}),
    ("probe", {"enabled": False}),
    ("consistency", {"teacher": "last_reflow", "data": "pairs"}),  # the inputs' digests are keyed
    ("base", {"resources": {"workers": 2, "gpus": 1}}),
]


@pytest.mark.parametrize("section, change", NOT_AN_OUTPUT, ids=[f"{s}.{','.join(c)}" for s, c in NOT_AN_OUTPUT])
def test_a_field_that_does_not_shape_a_stage_output_re_keys_nothing(section, change):
    before = load_config("quick")
    after = load_config("quick", overrides={section: change})
    assert getattr(after, section) != getattr(before, section)  # the change took
    for name in PipelineConfig.model_fields:
        assert getattr(after, name).keyed() == getattr(before, name).keyed(), f"{section} re-keyed {name}"


@pytest.mark.parametrize(
    "field, value",
    [
        ("reflow.model", "DiT-T/2"),  # a reflow round is its teacher's network
        ("ddpm.time_sampling", "uniform"),  # diffusion steps are drawn uniformly
        ("consistency.heldout_rows", 512),  # only base, reflow and ddpm score a held-out loss
        ("vae.heldout_rows", 512),
        ("features.heldout_rows", 512),
        ("base.class_dropout", 0.1),  # one name for label dropout: label_dropout
        ("consistency.class_dropout", 0.1),
    ],
)
def test_a_field_no_stage_reads_is_refused_not_silently_keyed(field, value):
    section, name = field.split(".")
    with pytest.raises(ConfigError, match=rf"unknown field '{field}'"):
        load_config("quick", overrides={section: {name: value}})


def test_label_dropout_has_one_name_and_its_default_reaches_every_generator_stage():
    config = PipelineConfig()
    for section in (config.base, config.reflow, config.consistency, config.ddpm):
        assert section.label_dropout == 0.1 and section.keyed()["label_dropout"] == 0.1


@pytest.mark.parametrize(
    "text, message",
    [
        ("latents:\n  resources: {workers: 0}\n", "resources.workers = 0 is Ray Train's local mode"),
        ("evaluate:\n  resources: {workers: 0}\n", "give this stage at least 1 worker"),
        ("serve:\n  resources: {workers: 0}\n", "only training stages have"),
        ("base:\n  resources: {workers: 0, gpus: 1}\n", "set workers to 1 or more to train on GPUs"),
    ],
)
def test_no_workers_is_local_mode_for_training_stages_only(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, text)
    assert message in str(error.value)


def test_a_training_stage_with_no_workers_runs_one_rank_that_takes_the_whole_batch(tmp_path):
    config = load_yaml(tmp_path, "base:\n  batch_size: 24\n  resources: {workers: 0}\n")
    assert config.base.resources.workers == 0 and config.base.ranks == 1
    assert load_yaml(tmp_path, "base:\n  batch_size: 24\n  resources: {workers: 3}\n").base.ranks == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("consistency:\n  teacher: guided\n", "consistency.teacher is guided"),
        ("guidance_distill:\n  scales: [4, 1]\n", "0 <= low <= high"),
        ("lora:\n  targets: []\n", "name at least one layer to adapt"),
        ("lora:\n  targets: [attn.q]\n", "lora.targets.0"),
        ("lora:\n  rank: 0\n", "lora.rank"),
    ],
)
def test_guidance_distillation_and_lora_sections_refuse_what_they_cannot_run(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_yaml(tmp_path, text)
    assert message in str(error.value)


def test_the_issue_25_stages_are_off_except_in_the_shapes_preset(tmp_path):
    assert not load_config("quick").guidance_distill.enabled and not load_config("default").lora.enabled
    shapes = load_config("shapes")
    assert shapes.guidance_distill.enabled and shapes.lora.enabled
    guided = load_yaml(tmp_path, "guidance_distill:\n  enabled: true\nconsistency:\n  teacher: guided\n")
    assert guided.consistency.teacher == "guided"
