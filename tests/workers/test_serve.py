"""The Serve app over real HTTP, started the way a user starts it: ``fewstep serve`` in a subprocess.

The subprocess attaches to the session's Ray (RAY_ADDRESS), serves tiny untrained generators
from a local store on a free port outside 8000-9000, and must exit 0 on Ctrl-C. Tests run in
file order against the one app: valid requests, batching and seeds, bad input, the model
card, the playground in a headless browser, swaps refused (NaN weights, a flipped byte), the
hot swap, the store moved away and back, a diffusion model, the shutdown, and last a refused
start. Before the app, a diffusion generator is drawn through ``Generator`` in process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from drills import kit
from infra.store import Manifest, Store
from workers.evaluation.table import COLUMNS
from workers.generator import Generator, Request
from workers.stages.s11_promote import promote

pytestmark = pytest.mark.timeout(300)

NUM_CLASSES, LATENT = kit.NUM_CLASSES, kit.LATENT  # the tiny store's: 16x16 grayscale through a 4x VAE
SERVED_STEPS = 2
DIFFUSION_T = 6  # a cosine schedule of 6 steps: below the app's max_steps, so the model's own limit shows
SERVE_YAML = f"""
serve:
  steps: {SERVED_STEPS}
  max_n: 16
  max_steps: 8
  max_guidance: 5.0
  max_batch_size: 16
  max_batch_images_steps: 32
  batch_wait_timeout_s: 0.05
  max_ongoing_requests: 64
  max_body_bytes: 4096
  poll_s: 0.2
  resources: {{workers: 1, cpus: 1}}
"""


# --------------------------------------------------------------------------- a store with two models


def commit_diffusion(store: Store, vae: Manifest, seed: int = 5) -> Manifest:
    """A diffusion-family generator as the ddpm stage writes it."""
    return kit.commit_generator(
        store, "ddpm", "diffusion", seed, vae, diffusion_schedule="cosine", diffusion_steps=DIFFUSION_T
    )


def commit_evaluation(store: Store, rows: list[tuple], inputs: list[Manifest]) -> Manifest:
    """Rows (model, sampler, steps, FID[, guidance])."""
    table = []
    for model, sampler, steps, fid, *scale in rows:
        row = dict.fromkeys(COLUMNS)
        row["guidance"] = scale[0] if scale else None
        row.update(
            model=model.stage,
            stage_key=model.ref,
            sampler=sampler,
            steps=steps,
            nfe=steps,
            n=100,
            extractor="test",
            fid=fid,
            precision=0.5,
            recall=0.5,
        )
        table.append(row)
    with store.begin("evaluate", "tiny", config={"test": True}, inputs=inputs) as writer:
        writer.write_table("metrics", pa.Table.from_pylist(table))
        return writer.commit(metrics={"rows": len(table)})


# --------------------------------------------------------------------------- a diffusion model, in process


def test_a_diffusion_generator_draws_with_both_samplers_deterministically_per_seed(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    generator = Generator.load(store, commit_diffusion(store, kit.commit_vae(store)), "cpu")
    assert list(generator.samplers) == ["ddim", "ddpm"]
    drawn = {}
    for sampler in ("ddim", "ddpm"):
        request = Request(n=3, steps=4, sampler=sampler, labels=(0, 2, NUM_CLASSES), guidance=2.0, seed=7)
        images = generator.generate(request)
        assert images.pixels.shape == (3, 16, 16, 1) and images.nfe == 4
        np.testing.assert_array_equal(generator.generate(request).pixels, images.pixels)  # same seed, same images
        reseeded = generator.generate(dataclasses.replace(request, seed=8)).pixels
        assert not np.array_equal(reseeded, images.pixels)
        # Batched with another request, each image keeps its own draws (every ancestral z included).
        other = Request(n=2, steps=4, sampler=sampler, labels=(1, 1), guidance=2.0, seed=99)
        together = generator.generate_many([other, request])
        assert np.abs(together[1].pixels.astype(int) - images.pixels.astype(int)).max() <= 1
        drawn[sampler] = images.pixels
    assert not np.array_equal(drawn["ddim"], drawn["ddpm"])  # the ancestral sampler's fresh noise shows
    # DDIM needs x_0 only; DDPM x_0 and one draw per step but the last.
    assert generator.noise_for(Request(n=2, steps=4, sampler="ddpm")).shape == (4, 2, *LATENT)
    assert generator.noise_for(Request(n=2, steps=4, sampler="ddim")).shape == (1, 2, *LATENT)
    with pytest.raises(ValueError, match=f"at most the schedule's T = {DIFFUSION_T}"):
        generator.generate(Request(n=1, steps=DIFFUSION_T + 1, sampler="ddim"))
    with pytest.raises(ValueError, match="sample it with ddim or ddpm, not 'euler'"):
        generator.sampler("euler")


def commit_flowmap(store: Store, vae: Manifest, seed: int = 6) -> Manifest:
    """A flow-map student as the flowmap stage writes it: a FlowMapDiT (its second time in use)."""
    import torch

    from infra.cards import GeneratorCard
    from models.dit import DiT, dit_config
    from models.flowmap_dit import flowmap_from_velocity
    from models.registry import model_spec

    torch.manual_seed(seed)
    teacher = DiT(dit_config("DiT-T/2", input_size=kit.LATENT[1], in_channels=kit.LATENT[0], num_classes=NUM_CLASSES))
    net = flowmap_from_velocity(teacher)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with store.begin("flowmap", f"tiny{seed}", config={"seed": seed}, inputs=[vae]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family="flowmap",
            steps=0,
            latent_shape=kit.LATENT,
            num_classes=NUM_CLASSES,
            latent_scale=1.0,
            vae_ref=vae.ref,
            guidance=2.0,
            objective="meanflow",
        )
        return writer.commit(metrics=card.to_metrics())


def test_a_flowmap_student_is_loaded_sanity_checked_and_drawn_by_its_family(tmp_path):
    from workers.serving.swap import load_served

    store = Store.open(str(tmp_path / "store"))
    student = commit_flowmap(store, kit.commit_vae(store))
    served = load_served(store, student.ref, solver="heun", steps=2)
    generator = served.generator
    assert served.sampler == "flowmap" and list(generator.samplers) == ["flowmap"]
    assert served.guidance == 2.0  # its distillation scale, in its card: served unguided
    assert not generator.sampler("flowmap").guided
    drawn = {}
    for steps in (1, 2, 4):
        request = Request(n=3, steps=steps, sampler="flowmap", labels=(0, 2, NUM_CLASSES), seed=7)
        images = generator.generate(request)
        assert images.pixels.shape == (3, 16, 16, 1) and images.nfe == steps
        np.testing.assert_array_equal(generator.generate(request).pixels, images.pixels)  # same seed, same images
        drawn[steps] = images.pixels
    assert not np.array_equal(drawn[1], drawn[4])  # the step count is used
    with pytest.raises(ValueError, match="sample it with flowmap, not 'euler'"):
        generator.sampler("euler")


# --------------------------------------------------------------------------- the app


@dataclass
class App:
    url: str
    port: int
    store: Store
    student: Manifest  # served first (consistency)
    flow: Manifest  # promoted during the hot-swap test (flow model, Euler)
    nan: Manifest  # NaN weights: never served
    corrupt: Manifest  # a good model with one byte of its weights flipped: never served
    evaluation: Manifest
    process: subprocess.Popen
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def wait_until_serving(process: subprocess.Popen, log: Path, url: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fewstep serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if "fewstep: serving" in log.read_text():
            if httpx.get(url + "healthz", timeout=10).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"fewstep serve did not come up in {timeout_s}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = Store.open(str(root / "store"))
    vae = kit.commit_vae(store)
    student = kit.commit_generator(store, "consistency", "consistency", 1, vae)
    flow = kit.commit_generator(store, "base", "flow", 2, vae)
    nan = kit.commit_generator(store, "base", "flow", 3, vae, poison="nan")
    corrupt = kit.commit_generator(store, "base", "flow", 4, vae)
    kit.flip_byte(store, corrupt)
    evaluation = commit_evaluation(
        store,
        [
            (student, "consistency", 1, 40.0),
            (student, "consistency", 2, 35.0),
            (student, "consistency", 4, float("nan")),  # diverged: still valid JSON
            (flow, "euler", 1, 60.0),
            (flow, "euler", 2, 45.0, 1.0),
            (flow, "euler", 2, 30.0, 2.5),  # its best at the served steps: promotion records the scale
        ],
        [student, flow],
    )
    store.put_pointer("serving/current", student.ref)
    config = root / "serve.yaml"
    config.write_text(SERVE_YAML)
    port = kit.free_port()
    log = root / "serve.log"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_USAGE_STATS_ENABLED="0")
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from flows.cli import main; main()",
                "serve",
                "--store",
                store.uri,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--config",
                str(config),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(process, log, url)
        yield App(url, port, store, student, flow, nan, corrupt, evaluation, process, log)
    finally:
        if process.poll() is None:  # the shutdown test did not run or failed: do not leak the app
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def decode(png_b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def assert_healthy(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


# --------------------------------------------------------------------------- valid requests


def test_generate_returns_the_images_asked_for(app):
    with app.client() as client:
        response = client.post("/v1/generate", json={"n": 3, "steps": 2, "labels": [0, 2, 3], "seed": 11})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == app.student.ref and body["steps"] == 2 and body["sampler"] == "consistency"
        assert body["nfe"] == 2 and body["seed"] == 11 and body["labels"] == [0, 2, 3]
        pixels = np.stack([decode(png) for png in body["images"]])
        assert pixels.shape == (3, 16, 16) and body["shape"] == [16, 16, 1]

        again = client.post(
            "/v1/generate", json={"n": 3, "steps": 2, "labels": [0, 2, 3], "seed": 11, "format": "array"}
        )
        assert again.status_code == 200, again.text
        arrays = np.asarray(again.json()["images"], dtype=np.int64)
        assert arrays.shape == (3, 16, 16, 1) and arrays.min() >= 0 and arrays.max() <= 255
        np.testing.assert_array_equal(arrays[..., 0], pixels)  # same seed, same images, in either format
        assert len(np.unique(pixels)) > 8  # not a blank image

        other = client.post("/v1/generate", json={"n": 3, "steps": 2, "labels": [0, 2, 3], "seed": 12}).json()
        assert not np.array_equal(np.stack([decode(png) for png in other["images"]]), pixels)

        defaults = client.post("/v1/generate", json={"n": 1}).json()  # served steps, no class, a random seed
        assert defaults["steps"] == SERVED_STEPS and defaults["labels"] == [NUM_CLASSES]
        assert isinstance(defaults["seed"], int)
        replay = client.post("/v1/generate", json={"n": 1, "seed": defaults["seed"]}).json()
        assert replay["images"] == defaults["images"]


def test_concurrent_requests_share_a_forward_pass_and_keep_their_seeds(app):
    def ask(seed: int, n: int) -> dict:
        with app.client() as client:
            response = client.post("/v1/generate", json={"n": n, "steps": 2, "labels": [1] * n, "seed": seed})
            assert response.status_code == 200, response.text
            return response.json()

    alone = ask(7, 4)
    assert alone["batch_requests"] == 1
    sizes = [4 if i == 5 else 1 + i % 3 for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda i: ask(7 if i == 5 else 100 + i, sizes[i]), range(12)))
    assert max(r["batch_requests"] for r in together) > 1, "no two concurrent requests shared a batch"
    mine = together[5]
    a = np.stack([decode(png) for png in alone["images"]]).astype(int)
    b = np.stack([decode(png) for png in mine["images"]]).astype(int)
    # Per-image seeds: the same images; a batched matmul may round one pixel differently by one level.
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99
    assert [len(r["images"]) for r in together] == sizes


def test_binary_answers_carry_the_same_pixels_as_json(app):
    body = {"n": 3, "steps": 2, "labels": [0, 2, 3], "seed": 11}
    with app.client() as client:
        reference = client.post("/v1/generate", json={**body, "format": "array"}).json()
        pixels = np.asarray(reference["images"], dtype=np.uint8)  # (3, 16, 16, 1)

        raw = client.post("/v1/generate", json=body, headers={"accept": "application/octet-stream"})
        assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
        shape = tuple(int(d) for d in raw.headers["x-shape"].split(","))
        assert shape == (3, 16, 16, 1) and raw.headers["x-dtype"] == "uint8"
        np.testing.assert_array_equal(np.frombuffer(raw.content, np.uint8).reshape(shape), pixels)
        assert raw.headers["x-model"] == reference["model"] and raw.headers["x-seed"] == "11"
        assert raw.headers["x-labels"] == "0,2,3" and raw.headers["x-steps"] == "2" and raw.headers["x-nfe"] == "2"

        png = client.post("/v1/generate", json={**body, "n": 1, "labels": [0]}, headers={"accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.format == "PNG" and image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), pixels[0, :, :, 0])  # image i depends on (seed, i) only

        many = client.post("/v1/generate", json=body, headers={"accept": "image/png"})
        assert many.status_code == 406 and "n=3" in many.json()["detail"]
        # A client that takes anything gets JSON.
        assert client.post("/v1/generate", json=body, headers={"accept": "*/*"}).json()["seed"] == 11


def test_a_batch_is_capped_by_images_times_steps(app):
    """max_batch_images_steps=32: a request of 16 images x 2 steps fills a batch alone, even in a crowd."""

    def ask(seed: int, n: int) -> dict:
        with app.client() as client:
            response = client.post("/v1/generate", json={"n": n, "steps": 2, "seed": seed})
            assert response.status_code == 200, response.text
            return response.json()

    with ThreadPoolExecutor(6) as pool:
        full = list(pool.map(lambda i: ask(i, 16), range(6)))
    assert [r["batch_requests"] for r in full] == [1] * 6
    with app.client() as client:
        too_big = client.post("/v1/generate", json={"n": 16, "steps": 4})
        assert too_big.status_code == 422 and "max_batch_images_steps=32" in too_big.text
        assert client.get("/v1/model").json()["limits"]["max_batch_images_steps"] == 32


def test_batch_cost_caps_requests_and_work_and_stops_waiting_for_absent_company():
    from workers.generator import Request
    from workers.serving.replica import BatchFill, Ticket, batch_cost

    fill = BatchFill(max_requests=4, max_images_steps=64)

    def tickets(*sizes: tuple[int, int]) -> list:
        return [Ticket(r, fill.cost(r), fill) for r in (Request(n=n, steps=s, sampler="") for n, s in sizes)]

    fill.expected = 8  # a crowd is expected: the batch waits until it is full
    assert batch_cost(tickets((1, 1), (1, 1))) == 2  # each request costs at least 1 of the 4
    assert batch_cost(tickets(*[(1, 1)] * 5)) > 4  # a fifth request does not fit
    assert batch_cost(tickets((16, 4))) == 4  # 64 images x steps fill the batch alone
    assert batch_cost(tickets((16, 4), (1, 1))) > 4
    assert batch_cost(tickets((8, 4), (8, 2))) == 3  # 48 of 64
    fill.expected = 2  # the last batch held two: two make a batch, no more waiting
    assert batch_cost(tickets((1, 1))) == 1 and batch_cost(tickets((1, 1), (1, 1))) == 4
    assert batch_cost(tickets((16, 4), (1, 1))) > 4  # never over the budget


def test_a_served_step_count_that_cannot_fit_a_batch_is_refused():
    from infra.config import ServeConfig

    with pytest.raises(ValueError, match="max_batch_images_steps=64 is below max_n=64 x the served steps=2"):
        ServeConfig(max_batch_images_steps=64, steps=2)


# --------------------------------------------------------------------------- bad input


BAD_REQUESTS = [
    # (name, raw body, expected status, text the message must contain)
    ("malformed JSON", b'{"n": 2,', 422, "JSON decode error"),
    ("not an object", b"[1, 2]", 422, "valid dictionary"),
    ("missing n", b"{}", 422, "Field required"),
    ("n as a string", b'{"n": "2"}', 422, "valid integer"),
    ("n as a float", b'{"n": 2.5}', 422, "valid integer"),
    ("n as a bool", b'{"n": true}', 422, "valid integer"),
    ("n zero", b'{"n": 0}', 422, "n=0 is out of range"),
    ("n negative", b'{"n": -3}', 422, "n=-3 is out of range"),
    ("n huge", b'{"n": 1000000000000000000000000}', 422, "out of range"),
    ("steps zero", b'{"n": 1, "steps": 0}', 422, "steps=0 is out of range"),
    ("steps negative", b'{"n": 1, "steps": -1}', 422, "steps=-1 is out of range"),
    ("steps huge", b'{"n": 1, "steps": 100000}', 422, "steps=100000 is out of range"),
    ("labels too short", b'{"n": 2, "labels": [0]}', 422, "got 1 labels for n=2"),
    ("labels out of range", b'{"n": 2, "labels": [0, 4]}', 422, "labels [4] are out of range"),
    ("negative label", b'{"n": 1, "labels": [-1]}', 422, "labels [-1] are out of range"),
    ("labels not ints", b'{"n": 1, "labels": ["a"]}', 422, "valid integer"),
    ("NaN guidance", b'{"n": 1, "guidance": NaN}', 422, "finite number"),
    ("infinite guidance", b'{"n": 1, "guidance": Infinity}', 422, "finite number"),
    ("guidance too large", b'{"n": 1, "guidance": 50}', 422, "guidance=50.0 is out of range"),
    ("negative guidance", b'{"n": 1, "guidance": -1}', 422, "guidance=-1.0 is out of range"),
    ("negative seed", b'{"n": 1, "seed": -5}', 422, "seed=-5 is out of range"),
    ("unknown format", b'{"n": 1, "format": "jpeg"}', 422, "'png' or 'array'"),
    ("unknown field", b'{"n": 1, "colour": "red"}', 422, "Extra inputs are not permitted"),
    ("oversized body", b'{"n": 1, "pad": "' + b"x" * 10_000 + b'"}', 413, "over the limit of 4096 bytes"),
]


@pytest.mark.parametrize("name, raw, status, message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_that_says_why(app, name, raw, status, message):
    with app.client() as client:
        response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        assert message in json.dumps(response.json()["detail"]), response.text
        assert_healthy(client)


def test_a_chunked_oversized_body_is_refused_and_bad_requests_do_not_fail_good_ones(app):
    def chunks():
        yield b'{"n": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    with app.client() as client:
        response = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert_healthy(client)

    # Good and bad requests at the same moment: every good one succeeds, every bad one is refused.
    def ask(i: int) -> tuple[int, int]:
        body = {"n": 2, "seed": i} if i % 2 else {"n": 2, "labels": [0, 99]}
        with app.client() as client:
            return i, client.post("/v1/generate", json=body).status_code

    with ThreadPoolExecutor(10) as pool:
        codes = dict(pool.map(ask, range(10)))
    assert all(code == (200 if i % 2 else 422) for i, code in codes.items()), codes


# --------------------------------------------------------------------------- model card, docs, playground


def test_model_card_docs_and_playground(app):
    with app.client() as client:
        card = client.get("/v1/model").json()
        assert card["ref"] == app.student.ref and card["sampler"] == "consistency" and not card["pinned"]
        assert card["num_classes"] == NUM_CLASSES and card["served_steps"] == SERVED_STEPS
        assert card["guidance"] == 1.0  # moved by hand, no scale recorded, none on its card
        assert card["limits"]["max_n"] == 16 and card["digest"] == app.student.digest
        assert [m["ref"] for m in card["lineage"]] == app.student.inputs  # its VAE
        evaluation = card["evaluation"]
        assert evaluation["ref"] == app.evaluation.ref
        assert {(r["steps"], r["fid"]) for r in evaluation["rows"]} == {(1, 40.0), (2, 35.0), (4, "nan")}

        schema = client.get("/openapi.json").json()
        assert {"/v1/generate", "/v1/model", "/healthz"} <= set(schema["paths"])
        assert "GenerateBody" in json.dumps(schema["components"])
        assert client.get("/docs").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "fewstep playground" in page.text


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_playground_in_a_headless_browser(app):
    if chromium_path() is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install -y chromium) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser test")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(app.url)
            page.wait_for_selector("#evaluation tr:nth-child(3)")  # header + the model's two rows
            assert app.student.ref in page.inner_text("#model-ref")
            assert "35" in page.inner_text("#evaluation")
            page.select_option("#label", "2")
            page.fill("#n", "6")
            page.fill("#seed", "3")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#grid img.sample').length === 6")
            page.wait_for_function(
                "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth === 16)"
            )
            assert "6 images from" in page.inner_text("#status")
            assert page.get_attribute("#grid img", "alt") == "label 2"
            page.fill("#n", "0")  # the server's refusal is shown, not swallowed (the form leaves checks to it)
            page.click("#generate")
            page.wait_for_function("document.querySelector('#status').classList.contains('error')")
            assert "n=0 is out of range" in page.inner_text("#status")
        finally:
            browser.close()


# --------------------------------------------------------------------------- swaps refused, hot swap, then Ctrl-C


# Ray forwards every worker's log on the cluster to a connected driver with a "(Actor pid=N)" tag, so the
# app's log also holds lines of actors the other tests left behind (a Ray Train placement-group cleaner).
RAY_TAG = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?P<actor>[^ )]+)")


def app_lines(text: str) -> str:
    """The lines written by the serve command itself or by its Serve actors."""
    kept = []
    for line in text.splitlines():
        tag = RAY_TAG.match(line)
        if tag is None or tag["actor"].startswith(("Serve", "ProxyActor")):
            kept.append(line)
    return "\n".join(kept)


def test_a_non_finite_or_corrupt_model_is_never_swapped_in(app):
    log_start = len(app.log.read_text())
    answers: list[tuple[int, str | None]] = []
    with app.client() as client:

        def ask() -> None:
            response = client.post("/v1/generate", json={"n": 1, "seed": 5})
            answers.append((response.status_code, response.json().get("model")))

        try:
            for bad, error in (
                (
                    app.nan,
                    "UnfitModel: base/tiny3-nan: 1 tensor(s) of its network hold NaN or inf "
                    "(final_layer.linear.weight)",
                ),
                (app.corrupt, "IntegrityError: file 'model' of base/tiny4 at "),
            ):
                app.store.put_pointer("serving/current", bad.ref)
                health = kit.wait_for(
                    lambda bad=bad: (
                        (h := client.get("/healthz").json())["failed_swap"] and h["failed_swap"]["ref"] == bad.ref and h
                    ),
                    30,
                    f"/healthz to report {bad.ref}",
                )
                assert health["status"] == "degraded" and health["model"] == app.student.ref
                assert health["failed_swap"]["error"].startswith(error), health
                assert (
                    f"could not switch to {bad.ref}" in health["reasons"][0] and "next try in" in health["reasons"][0]
                )
                for _ in range(15):  # > 10 polls of 0.2 s: the failed ref is not reloaded each time
                    ask()
                    time.sleep(0.15)
                again = client.get("/healthz").json()
                assert again["failed_swap"]["attempts"] == 1 and again["failed_swap"]["retry_in_s"] > 200, again
                line = f"could not switch to {bad.ref}"
                kit.wait_for(
                    lambda line=line: line in app.log.read_text()[log_start:], 30, "the failed swap's log line"
                )
                assert app.log.read_text()[log_start:].count(line) == 1, (
                    "a failed swap was retried (or logged) per poll"
                )
        finally:
            app.store.put_pointer("serving/current", app.student.ref)
        kit.wait_for(
            lambda: (
                client.get("/healthz").json()
                == {"status": "ok", "model": app.student.ref, "reasons": [], "failed_swap": None}
            ),
            30,
            "/healthz to be ok again",
        )
    assert answers == [(200, app.student.ref)] * len(answers) and len(answers) == 30, answers
    assert "Traceback" not in app_lines(app.log.read_text()[log_start:]), "a failed swap logged a traceback"


def test_promotion_swaps_the_model_under_a_stream_of_requests(app):
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def stream(worker: int) -> None:
        with app.client() as client:
            i = 0
            while not stop.is_set():
                response = client.post("/v1/generate", json={"n": 2, "seed": worker * 10_000 + i})
                results.append((response.status_code, response.json().get("model")))
                i += 1

    def wait_for(condition, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out; last results {results[-10:]}"
            time.sleep(0.05)

    threads = [threading.Thread(target=stream, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(results) >= 8)
        decision = promote(app.store, app.flow.ref, app.evaluation.ref, served_steps=SERVED_STEPS)
        assert decision.promoted, decision.reason
        assert (decision.candidate_fid, decision.current_fid, decision.guidance) == (30.0, 35.0, 2.5)
        promoted_at = len(results)
        wait_for(lambda: [ref for _, ref in results[promoted_at:]][-8:] == [app.flow.ref] * 8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert [code for code, _ in results] == [200] * len(results), "a request failed during the swap"
    refs = [ref for _, ref in results]
    assert refs[0] == app.student.ref and refs[-1] == app.flow.ref
    assert set(refs) == {app.student.ref, app.flow.ref}
    with app.client() as client:
        card = client.get("/v1/model").json()
        assert card["ref"] == app.flow.ref and card["family"] == "flow" and card["sampler"] == "euler"
        assert client.get("/healthz").json() == {
            "status": "ok",
            "model": app.flow.ref,
            "reasons": [],
            "failed_swap": None,
        }
        body = client.post("/v1/generate", json={"n": 2, "guidance": 2.0, "labels": [0, 1]}).json()
        assert body["model"] == app.flow.ref and body["guidance"] == 2.0
        # Left out, the guidance is the served model's own: the scale promotion recorded with the pointer.
        assert card["guidance"] == 2.5
        body = client.post("/v1/generate", json={"n": 2, "labels": [0, 1]}).json()
        assert body["model"] == app.flow.ref and body["guidance"] == 2.5


def test_health_is_degraded_while_the_store_is_moved_away(app):
    root = Path(app.store.uri)
    moved = root.with_name("store-moved")
    with app.client() as client:
        os.rename(root, moved)
        try:
            health = kit.wait_for(
                lambda: (h := client.get("/healthz").json())["status"] == "degraded" and h,
                30,
                "/healthz to notice the store is gone",
            )
            assert health["model"] == app.flow.ref
            reasons = " | ".join(health["reasons"])
            assert f"the served model {app.flow.ref} is no longer in the store {app.store.uri}" in reasons, reasons
            assert f"the pointer 'serving/current' is unset in {app.store.uri}" in reasons, reasons
            response = client.post("/v1/generate", json={"n": 1})  # still serving from memory
            assert response.status_code == 200 and response.json()["model"] == app.flow.ref
        finally:
            os.rename(moved, root)
        kit.wait_for(lambda: client.get("/healthz").json()["status"] == "ok", 30, "/healthz to recover")


def test_a_diffusion_model_is_served_like_any_other(app):
    """Promotion never picks the ddpm model in a pipeline, but served (here by moving the pointer) it works."""
    ddpm = commit_diffusion(app.store, app.store.get_ref(app.student.inputs[0]))
    app.store.put_pointer("serving/current", ddpm.ref)
    with app.client() as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").json()["model"] != ddpm.ref:
            assert time.monotonic() < deadline, client.get("/healthz").json()
            time.sleep(0.1)
        ask = {"n": 2, "labels": [0, 1], "guidance": 1.5, "seed": 21}
        body = client.post("/v1/generate", json=ask).json()
        assert (body["model"], body["family"], body["sampler"]) == (ddpm.ref, "diffusion", "ddim")
        assert body["steps"] == body["nfe"] == SERVED_STEPS and body["guidance"] == 1.5  # guided, like a flow model
        assert client.post("/v1/generate", json=ask).json()["images"] == body["images"]  # same seed, same images
        assert client.post("/v1/generate", json={**ask, "seed": 22}).json()["images"] != body["images"]
        # Up to its T steps; beyond them the model's own limit answers (below the config's max_steps of 8).
        assert client.post("/v1/generate", json={"n": 1, "steps": DIFFUSION_T}).json()["nfe"] == DIFFUSION_T
        beyond = client.post("/v1/generate", json={"n": 1, "steps": DIFFUSION_T + 1})
        assert beyond.status_code == 422 and f"use 1..{DIFFUSION_T}" in beyond.text
        card = client.get("/v1/model").json()
        assert card["family"] == "diffusion" and card["sampler"] == "ddim" and card["ref"] == ddpm.ref


def test_ctrl_c_stops_the_app_cleanly(app):
    app.process.send_signal(signal.SIGINT)
    assert app.process.wait(timeout=90) == 0, app.log.read_text()[-4000:]
    assert "fewstep: stopped" in app.log.read_text()
    assert "the store watcher failed" not in app.log.read_text()  # it stops with the replica, quietly
    with socket.socket() as probe:  # the HTTP proxy is gone with the app
        assert probe.connect_ex(("127.0.0.1", app.port)) != 0


def test_serve_refuses_to_start_a_non_finite_or_corrupt_model(app, tmp_path):
    """Checked in the driver before anything is deployed: one line, exit status 2, in seconds."""
    assert app.process.poll() is not None, "the app of this module must be stopped first"
    config = tmp_path / "serve.yaml"
    config.write_text(SERVE_YAML)
    for bad, message in (
        (app.nan, "base/tiny3-nan: 1 tensor(s) of its network hold NaN or inf"),
        (app.corrupt, "file 'model' of base/tiny4 at "),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from flows.cli import main; main()",
                "serve",
                "--store",
                app.store.uri,
                "--model",
                bad.ref,
                "--port",
                str(kit.free_port()),
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"fewstep: error: {message}" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "fewstep: serving" not in done.stdout
        print(f"{bad.ref} refused in {time.monotonic() - started:.1f}s")


def test_replicas_autoscaling_and_resources_come_from_the_config():
    from infra.config import Resources, ServeConfig
    from workers.serving.app import FewstepGenerator, deployment_options

    fixed = deployment_options(
        ServeConfig(resources=Resources(workers=2, cpus=2, gpus=0.5), max_queued_requests=9),
        "base/x",
        max_batch_size=16,
    )
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert fixed["max_queued_requests"] == 9 and fixed["max_ongoing_requests"] >= 16
    assert fixed["user_config"] == {"model": "base/x"}
    scaled = deployment_options(ServeConfig(max_replicas=4, target_ongoing_requests=3), None, 1)
    assert scaled["num_replicas"] == "auto"
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    for options in (fixed, scaled):  # Serve accepts them
        assert FewstepGenerator.options(**options).max_queued_requests == options["max_queued_requests"]
