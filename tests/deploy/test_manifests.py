"""The files under deploy/ and prefect.yaml, checked for what fewstep relies on in them.

Docker is not run here, and no Kubernetes: the Dockerfile is parsed instruction by instruction,
each KubeRay manifest as YAML, the RayService's Serve config through Ray's own Serve schema and
fewstep's app builder, and every fewstep config they carry through fewstep's config loader.
"""

from __future__ import annotations

import inspect
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from infra.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
TRAIN_STAGES = ("vae", "base", "reflow", "consistency", "flowmap")  # Ray Train: all workers at once


# --------------------------------------------------------------------------- Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path} ends inside a continued line"
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_dockerfile_builds_fewstep_on_a_ray_image_in_cpu_and_cuda_variants():
    steps = instructions(DEPLOY / "Dockerfile")
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert [word for word, _ in steps].count("FROM") == 1, "one stage: the image users run"
    global_args = dict(rest.split("=", 1) for word, rest in steps[:first_from] if word == "ARG")
    assert global_args["VARIANT"] == "cpu"  # the default build is the CPU image
    assert global_args["RAY_VERSION"] == ray.__version__, "the image's Ray must be the one fewstep is tested with"
    python = re.fullmatch(r"py3(\d+)", global_args["PYTHON_TAG"])
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and int(python.group(1)) >= int(re.search(r"3\.(\d+)", requires).group(1)), requires

    image = steps[first_from][1]
    assert expand(image, global_args) == f"rayproject/ray:{ray.__version__}-{global_args['PYTHON_TAG']}-cpu"
    assert expand(image, {**global_args, "VARIANT": "gpu"}).endswith("-gpu")  # Ray's CUDA image

    body = steps[first_from + 1 :]
    assert ("ARG", "VARIANT") in body, "ARG VARIANT must be declared again after FROM to be seen by RUN"
    runs = " ".join(rest for word, rest in body if word == "RUN")
    assert re.search(r'"\$VARIANT" = "cpu"', runs) and "download.pytorch.org/whl/cpu" in str(body)
    assert len(re.findall(r"pip install --no-cache-dir[^;]* \.(\s|;|$)", runs)) == 2, runs  # the project, both variants
    assert "fewstep version" in runs  # the console script works in the image

    copied = set()
    for word, rest in body:
        if word == "COPY":
            sources = [part for part in rest.split() if not part.startswith("--")][:-1]
            copied.update(source.rstrip("/") for source in sources)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} | {"pyproject.toml", "README.md", "prefect.yaml"} <= copied, copied
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "tests" in ignored and ".git" in ignored and not {p.rstrip("*") for p in packages} & set(ignored)


# --------------------------------------------------------------------------- KubeRay


def load_docs(name: str) -> dict[str, dict]:
    """kind -> document of a (multi-document) manifest."""
    docs = [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def containers(cluster: dict) -> list[tuple[str, dict, dict]]:
    """(group, group spec, container) for the head and every worker group of a RayCluster spec."""
    out = [("head", cluster["headGroupSpec"], c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        out += [(group["groupName"], group, c) for c in group["template"]["spec"]["containers"]]
    return out


def quantity(value) -> float:
    return float(str(value).rstrip("m")) / (1000 if str(value).endswith("m") else 1)


def check_cluster(cluster: dict) -> dict[str, float]:
    """The checks every cluster spec passes; returns its capacity (CPUs, GPUs, GPUs per pod, CPUs per pod)."""
    assert cluster["rayVersion"] == ray.__version__
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0" and head_params["dashboard-host"] == "0.0.0.0"
    capacity = {"cpus": 0.0, "gpus": 0.0, "gpus_per_pod": 0.0, "cpus_per_pod": 0.0}
    tags = set()
    for group, spec, container in containers(cluster):
        image, tag = container["image"].rsplit(":", 1)
        tags.add(tag.rsplit("-", 1)[0])
        env = {item["name"]: item for item in container["env"]}
        for name in SECRET_VARS:  # S3 keys from a Secret, never a literal
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "fewstep-s3", env[
                name
            ]
        assert env["AWS_DEFAULT_REGION"]["value"]
        limits = container["resources"]["limits"]
        gpus = float(limits.get("nvidia.com/gpu", 0))
        if group == "head":
            assert tag.endswith("-cpu") and gpus == 0, "the head is a CPU pod"
            continue
        assert tag.endswith("-gpu") and gpus >= 1, f"{group}: a GPU pod runs the CUDA image"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        pods = spec["maxReplicas"]
        assert spec["minReplicas"] <= spec["replicas"] <= pods
        capacity["cpus"] += pods * quantity(limits["cpu"])
        capacity["gpus"] += pods * gpus
        capacity["gpus_per_pod"] = max(capacity["gpus_per_pod"], gpus)
        capacity["cpus_per_pod"] = max(capacity["cpus_per_pod"], quantity(limits["cpu"]))
    assert len(tags) == 1, f"one fewstep version across the cluster, got {tags}"
    assert capacity["gpus"] > 0, "no GPU worker group"
    return capacity


def test_raycluster_has_a_cpu_head_and_a_gpu_worker_group():
    cluster = load_docs("raycluster.yaml")["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    groups = [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert groups == ["gpu"]
    check_cluster(cluster["spec"])


def test_rayjob_runs_the_pipeline_against_s3_with_a_config_the_cluster_can_hold():
    docs = load_docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["fewstep", "run"], argv
    options = dict(zip(argv[2::2], argv[3::2]))
    assert options["--store"].startswith("s3://"), options

    # The config file the entrypoint names is the ConfigMap's, mounted into the head (the driver).
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (mount,) = [
        m for m in head["containers"][0]["volumeMounts"] if options["--config"].startswith(m["mountPath"] + "/")
    ]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    file_name = options["--config"][len(mount["mountPath"]) + 1 :]
    config = load_config("default", overrides=yaml.safe_load(config_map["data"][file_name]))

    # Every stage's request fits the cluster (else it would wait forever for resources).
    capacity = check_cluster(cluster)
    for name in PipelineConfig.model_fields:
        if "resources" not in type(getattr(config, name)).model_fields:
            continue  # a section the flow reads (retrain), not a stage's request
        resources = getattr(config, name).resources
        assert resources.gpus <= capacity["gpus_per_pod"] and resources.cpus <= capacity["cpus_per_pod"], name
        together = resources.workers if name in TRAIN_STAGES else 1
        assert together * resources.gpus <= capacity["gpus"], (name, resources)
        assert together * resources.cpus <= capacity["cpus"] - 1, (name, resources)  # a CPU left for Ray Data
    assert config.base.resources.gpus >= 1, "the example trains on GPUs"


def test_rayservice_serve_config_passes_rays_schema_and_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    from workers.serving.app import AppArgs, build
    from workers.serving.deploy import IMPORT_PATH, validate

    service = load_docs("rayservice.yaml")["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = validate(serve_config)
    assert isinstance(schema, ServeDeploySchema)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and app.route_prefix == "/"
    args = AppArgs.model_validate(app.args)
    assert args.store.startswith("s3://") and args.model is None  # follows serving/current
    application = build(app.args)  # the builder accepts exactly these args (no cluster needed to bind)
    assert type(application).__name__ == "Application"

    cluster = service["spec"]["rayClusterConfig"]
    capacity = check_cluster(cluster)
    port = schema.http_options.port
    serve_ports = {
        p["containerPort"] for _, _, c in containers(cluster) for p in c.get("ports", []) if p["name"] == "serve"
    }
    assert serve_ports == {port} and schema.http_options.host == "0.0.0.0"
    replicas = args.serve.max_replicas or args.serve.resources.workers
    assert args.serve.resources.gpus <= capacity["gpus_per_pod"]
    assert replicas * args.serve.resources.gpus <= capacity["gpus"], (
        "the autoscaling maximum does not fit the GPU group"
    )


# --------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_names_the_pipeline_flow_its_parameters_and_a_valid_cron():
    from prefect.client.schemas.schedules import CronSchedule

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = project["deployments"]
    path, function = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file() and path == "flows/pipeline.py" and function == "pipeline"
    from flows.pipeline import pipeline

    accepted = set(inspect.signature(pipeline.fn).parameters)
    assert set(deployment["parameters"]) <= accepted and {"config", "store_uri"} <= set(deployment["parameters"])
    PipelineConfig.model_validate(deployment["parameters"]["config"])  # the flow's own validation
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployment["work_pool"]["name"] == "fewstep"
    text = (ROOT / "prefect.yaml").read_text()
    assert not any(f"{name}:" in text for name in SECRET_VARS), "credentials belong to the worker's environment"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
