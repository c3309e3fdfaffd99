"""The Serve config file that starts fewstep's app on a running cluster: ``serve deploy``, ``serve run``
and a KubeRay RayService's ``serveConfigV2`` all take it.

    proxy_location: EveryNode
    http_options: {host: 0.0.0.0, port: 8000}
    applications:
    - name: fewstep
      route_prefix: /
      import_path: workers.serving.app:build
      args: {store: s3://bucket/fewstep, model: null, serve: {...the serve section...}}
      runtime_env: {env_vars: {AWS_ENDPOINT_URL: ..., AWS_DEFAULT_REGION: ...}}

``args`` are :class:`~workers.serving.app.AppArgs`. The file never holds a secret: replicas
read their S3 keys from their own environment (the node's, a KubeRay Secret, an IAM role).
What it may carry in ``runtime_env.env_vars`` are the store's non-secret settings (endpoint,
region) and, from a runtime_env the user names, references such as
``AWS_SECRET_ACCESS_KEY: ${MY_S3_SECRET}`` that Ray expands on the replica's node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ray.serve.schema import ServeDeploySchema

from infra.config import ConfigError, ServeConfig
from workers.serving.app import APP_NAME, AppArgs

IMPORT_PATH = "workers.serving.app:build"
# Where replicas find the store's non-secret settings; copied into the file when set here.
STORE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
# Credentials: replicas read these from their own environment; the file may only reference them.
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")  # ${NAME}: expanded by Ray on the replica's node


class SecretInConfig(ConfigError):
    """A runtime_env that would write a secret's value into the Serve config."""


def check_no_secrets(env_vars: Mapping[str, str], source: str) -> None:
    """Refuse a literal value for a variable named like a secret; ``${NAME}`` references are fine."""
    for name, value in env_vars.items():
        if SECRET_NAME.search(name) and not REFERENCE.match(str(value)):
            raise SecretInConfig(
                f"{source} sets env var {name} to a literal value: the Serve config must not hold secrets. "
                f"Give the replicas {name} through their environment (a KubeRay Secret, the node's env), "
                f"or reference another variable: {name}: ${{MY_{name}}}"
            )


def store_env(store_uri: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The non-secret S3 settings of this environment, for an S3 store (nothing for a local one)."""
    if not store_uri.startswith("s3://"):
        return {}
    return {name: environ[name] for name in STORE_SETTINGS if environ.get(name)}


def serve_config(
    store_uri: str,
    serve: ServeConfig,
    model: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
) -> dict[str, Any]:
    """A Serve config (``ServeDeploySchema``-valid, as a plain dict) for fewstep's app.

    ``serve`` is the config's serve section (limits, batching, replicas, resources); ``model``
    pins a ref, else the app follows ``serving/current``. ``host``/``port`` default to the
    section's. ``runtime_env`` is merged over the store's settings taken from ``environ``."""
    host, port = serve.host if host is None else host, serve.port if port is None else port
    serve = serve.model_copy(update={"host": host, "port": port})  # the args say where it listens, as Serve does
    args = AppArgs(store=store_uri, model=model, serve=serve)  # the builder's own validation, here
    env_vars = store_env(store_uri, environ or {})
    runtime = dict(runtime_env or {})
    user_vars = dict(runtime.pop("env_vars", None) or {})
    check_no_secrets(user_vars, "the runtime_env")
    env_vars.update(user_vars)
    if env_vars:
        runtime["env_vars"] = env_vars
    application: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json"),
    }
    if runtime:
        application["runtime_env"] = runtime
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [application],
    }
    validate(config)
    return config


def validate(config: Mapping[str, Any]) -> ServeDeploySchema:
    """Ray's own schema of a Serve config file, plus fewstep's: every fewstep app's args are AppArgs."""
    schema = ServeDeploySchema.model_validate(dict(config))
    for app in schema.applications:
        if app.import_path == IMPORT_PATH:
            AppArgs.model_validate(app.args)
            check_no_secrets((app.runtime_env or {}).get("env_vars") or {}, f"application {app.name!r}")
    return schema
