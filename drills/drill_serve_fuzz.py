"""Drill: property-based fuzzing of POST /v1/generate from the app's own OpenAPI schema: no 5xx, ever.

    python -m drills.drill_serve_fuzz [--examples 2000] [--seed 0] [--json]

Starts the real app on a tiny synthetic store, reads ``/openapi.json`` and ``/v1/model`` from
it, and builds hypothesis strategies from the ``GenerateBody`` schema (``$ref``, ``anyOf``,
``enum``, types, ``required``, ``additionalProperties``). Each example is one request of
one of these kinds:

    in_limits   schema-valid and within the served limits (from /v1/model)  -> must be 200, n images
    schema      schema-valid, values unbounded (huge ints, any floats)      -> 200 or 422
    mutated     a required field dropped, an unknown field added, a value of the wrong type
                (any JSON: NaN and infinities, nested lists, objects)        -> 4xx
    raw         arbitrary bytes, or schema-valid JSON cut short             -> 4xx (400 for bytes
                                                                               that are not text)

The property: no 5xx, every answer is JSON, a 200 carries ``n`` images, and every
``in_limits`` request gets a 200. Hypothesis shrinks a failing example and the drill prints
it. Figures: examples, statuses per kind, seconds.

``--json`` prints one JSON object with every figure as the last line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from drills import kit

MAX_SEED = 2**63 - 1

# Any JSON value, hostile ones included: NaN and infinities (written as NaN / Infinity tokens).
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], definitions: dict[str, Any]) -> st.SearchStrategy:
    """Values that satisfy a JSON schema (the subset FastAPI writes for a pydantic model)."""
    if "$ref" in schema:
        return from_schema(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, definitions) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum"), max_value=schema.get("maximum"), allow_nan=False, allow_infinity=False
        )
    if kind == "string":
        return st.text(max_size=schema.get("maxLength", 32))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(
            from_schema(schema.get("items", {}), definitions),
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 8), 8),
        )
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {name: from_schema(properties[name], definitions) for name in properties if name in required},
            optional={name: from_schema(properties[name], definitions) for name in properties if name not in required},
        )
    if not schema:
        return ANY_JSON
    raise ValueError(f"no strategy for the schema {schema!r}: extend from_schema")


def within(schema: dict[str, Any], limits: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The GenerateBody schema narrowed to the served limits (the bounds live in the server, not the schema)."""
    bounds = {
        "n": (1, limits["max_n"]),
        "steps": (1, limits["max_steps"]),
        "guidance": (0, limits["max_guidance"]),
        "seed": (0, MAX_SEED),
        "labels": (0, num_classes),
    }
    narrowed = json.loads(json.dumps(schema))

    def bound(node: dict[str, Any], low, high) -> None:
        for option in node.get("anyOf", [node]):
            if option.get("type") in ("integer", "number"):
                option.update(minimum=low, maximum=high)
            if option.get("type") == "array":
                option["items"] = {**option["items"], "minimum": low, "maximum": high}

    for name, (low, high) in bounds.items():
        bound(narrowed["properties"][name], low, high)
    return narrowed


@dataclass(frozen=True)
class Case:
    kind: str
    raw: bytes
    must_succeed: bool


def cases(
    schema: dict[str, Any], definitions: dict[str, Any], limits: dict[str, Any], num_classes: int, adapter: bool = False
):
    """The strategy of requests: in_limits, schema, mutated and raw, as in the module docstring.
    ``adapter``: the served model is an adapter, so ``adapter: false`` (its base) is within its limits."""
    names = list(schema["properties"])

    def encode(body) -> bytes:
        return json.dumps(body, allow_nan=True).encode()

    def fit_labels(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("labels"):  # one label per image, as the limits require
            body["labels"] = (body["labels"] * body["n"])[: body["n"]]
        elif "labels" in body and body["labels"] is not None:
            del body["labels"]
        return body

    def fit_adapter(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("adapter") is False and not adapter:  # only an adapter's base can be asked for
            del body["adapter"]
        return body

    in_limits = (
        from_schema(within(schema, limits, num_classes), definitions)
        .map(fit_labels)
        .map(fit_adapter)
        .map(lambda body: Case("in_limits", encode(body), True))
    )
    valid = from_schema(schema, definitions)
    conforming = valid.map(lambda body: Case("schema", encode(body), False))
    mutated = st.one_of(
        valid.map(lambda body: {k: v for k, v in body.items() if k != "n"}),
        st.tuples(valid, st.text(min_size=1, max_size=8).filter(lambda k: k not in names), ANY_JSON).map(
            lambda t: {**t[0], t[1]: t[2]}
        ),
        st.tuples(valid, st.sampled_from(names), ANY_JSON).map(lambda t: {**t[0], t[1]: t[2]}),
        ANY_JSON,
    ).map(lambda body: Case("mutated", encode(body), False))
    raw = st.one_of(
        st.binary(max_size=256),
        st.tuples(valid, st.integers(min_value=0, max_value=40)).map(lambda t: encode(t[0])[: t[1]]),
    ).map(lambda data: Case("raw", data, False))
    kinds = {"in_limits": in_limits, "schema": conforming, "mutated": mutated, "raw": raw}
    return st.sampled_from(sorted(kinds)).flatmap(kinds.__getitem__)  # each kind a quarter of the examples


@dataclass(frozen=True)
class FuzzFigures:
    examples: int
    seconds: float
    status: dict[str, dict[str, int]]  # kind -> status -> count
    server_errors: int  # 5xx answers (must be 0)
    in_limits_failed: int  # in_limits requests without a 200 (must be 0)
    falsified: str | None  # hypothesis's shrunk failing example and why, if any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(response: httpx.Response, case: Case) -> None:
    assert response.status_code < 500, (
        f"{response.status_code} for {case.kind} body {case.raw[:200]!r}: {response.text[:300]}"
    )
    body = response.json()  # every answer is JSON
    if response.status_code == 200:  # then the body was a request for n images
        n = json.loads(case.raw)["n"]
        assert len(body["images"]) == n, f"200 with {len(body['images'])} images for n={n}: {case.raw[:200]!r}"
    else:
        # 400: bytes FastAPI cannot decode as text; 413: over the body limit; 422: anything else refused
        assert response.status_code in (400, 413, 422) and "detail" in body, (
            f"{response.status_code}: {response.text[:300]}"
        )
    if case.must_succeed:
        assert response.status_code == 200, (
            f"{response.status_code} for an in-limits body {case.raw!r}: {response.text[:300]}"
        )


def fuzz_drill(url: str, examples: int, seed_value: int = 0) -> FuzzFigures:
    openapi = httpx.get(url + "openapi.json", timeout=30).json()
    card = httpx.get(url + "v1/model", timeout=30).json()
    definitions = openapi["components"]["schemas"]
    body_schema = openapi["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = definitions[body_schema["$ref"].rsplit("/", 1)[-1]]
    strategy = cases(schema, definitions, card["limits"], card["num_classes"], bool(card.get("adapter_of")))
    status: dict[str, Counter] = defaultdict(Counter)
    started = time.perf_counter()

    with httpx.Client(base_url=url, timeout=60) as client:

        @seed(seed_value)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        @given(strategy)
        def no_server_errors(case: Case) -> None:
            response = client.post("v1/generate", content=case.raw, headers={"content-type": "application/json"})
            status[case.kind][str(response.status_code)] += 1
            check(response, case)

        try:
            no_server_errors()
            falsified = None
        except AssertionError as error:
            falsified = str(error)[:1000]
    seconds = time.perf_counter() - started
    counted = {kind: dict(sorted(c.items())) for kind, c in sorted(status.items())}
    return FuzzFigures(
        examples=sum(sum(c.values()) for c in status.values()),
        seconds=round(seconds, 1),
        status=counted,
        server_errors=sum(v for c in status.values() for k, v in c.items() if k.startswith("5")),
        in_limits_failed=sum(v for k, v in status["in_limits"].items() if k != "200"),
        falsified=falsified,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object, last")
    args = parser.parse_args()

    with kit.serving_tiny_store() as (url, tiny, workdir):
        figures = fuzz_drill(url, args.examples, args.seed)
    print(
        f"fuzz: {figures.examples} requests in {figures.seconds}s; 5xx: {figures.server_errors}; in-limits "
        f"without a 200: {figures.in_limits_failed}",
        flush=True,
    )
    for kind, counts in figures.status.items():
        print(f"  {kind:9s} {counts}", flush=True)
    if figures.falsified:
        print(f"  FALSIFIED: {figures.falsified}", flush=True)
    if args.json:
        kit.print_json_last({**figures.as_dict(), "seed": args.seed})


if __name__ == "__main__":
    main()
