"""benchmarks/plain_server.py, serve_bench's contender: its batch queue keeps Serve's rule, and it
answers in the Serve endpoint's format, because it runs the same replica code.

No timing is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plain_server  # noqa: E402
import serve_bench  # noqa: E402


def test_the_batch_queue_fills_by_size_and_closes_on_its_timeout():
    async def scenario() -> tuple[list[list[int]], list[int]]:
        batches: list[list[int]] = []

        async def handle(items: list[int]) -> list[int]:
            batches.append(items)
            await asyncio.sleep(0)
            return [10 * i for i in items]

        queue = plain_server.MicroBatcher(handle, max_size=4, wait_s=0.05)
        first = await asyncio.gather(*(queue.submit(i) for i in range(6)))  # arrive together
        lone = await queue.submit(99)  # alone: the batch closes on its timeout with one item
        return batches, [*first, lone]

    batches, results = asyncio.run(scenario())
    assert batches == [[0, 1, 2, 3], [4, 5], [99]]
    assert results == [0, 10, 20, 30, 40, 50, 990]


def test_a_failed_batch_fails_its_requests_and_the_queue_keeps_serving():
    async def scenario() -> tuple[str, int]:
        async def handle(items: list[int]) -> list:
            if 0 in items:
                raise ValueError("boom")
            return items

        queue = plain_server.MicroBatcher(handle, max_size=1, wait_s=0)
        try:
            await queue.submit(0)
        except ValueError as error:
            failed = str(error)
        return failed, await queue.submit(1)

    assert asyncio.run(scenario()) == ("boom", 1)


def test_the_plain_server_answers_like_the_serve_endpoint(tmp_path):
    store, ref = serve_bench.synthetic_store(str(tmp_path / "store"))
    with serve_bench.plain_server(store.uri, ref, 8, 5.0, 2, 2, 1.0, "cpu") as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            body = {"n": 2, "steps": 2, "seed": 7, "labels": [1, 10]}
            answer = client.post("/v1/generate", json=body)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["model"] == ref and got["steps"] == 2 and got["seed"] == 7 and got["labels"] == [1, 10]
            assert len(got["images"]) == 2 and base64.b64decode(got["images"][0]).startswith(b"\x89PNG")
            assert got["batch_requests"] >= 1 and got["shape"] == [16, 16, 1]

            raw = client.post("/v1/generate", json=body, headers={"accept": "application/octet-stream"})
            assert raw.status_code == 200 and raw.headers["x-shape"] == "2,16,16,1"
            assert np.frombuffer(raw.content, np.uint8).size == 2 * 16 * 16

            bad = client.post("/v1/generate", json={"n": 2, "labels": [1]})
            assert bad.status_code == 422 and "got 1 labels for n=2" in bad.text
            plain = client.post("/v1/generate", json={"n": 1, "adapter": False})
            assert plain.status_code == 422 and "is not an adapter: leave adapter out" in plain.text
            assert client.get("/healthz").json()["status"] == "ok"


def commit_adapter(store, vae_ref: str):
    """A flow base and a LoRA student on it, as the base and lora stages write them (random weights)."""
    import torch

    from infra.cards import GeneratorCard
    from models.dit import DiT, dit_config
    from models.lora import adapter_state, lora_from_velocity
    from models.registry import model_spec

    torch.manual_seed(3)
    base = DiT(dit_config("DiT-T/2", input_size=4, in_channels=4, num_classes=10))
    with torch.no_grad():  # off AdaLN-Zero's zeros, so the network and its adapter matter
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    space = dict(latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.0, vae_ref=vae_ref)
    with store.begin("base", "adapted", config={"seed": 3}) as writer:
        writer.write_model("model", base, model_spec(base))
        base_manifest = writer.commit(metrics=GeneratorCard(family="flow", steps=0, **space).to_metrics())
    net = lora_from_velocity(base, rank=2)
    with torch.no_grad():
        for layer in net.adapters():
            layer.lora_up.normal_(std=0.5)
    with store.begin("lora", "adapted", config={"seed": 3}, inputs=[base_manifest]) as writer:
        writer.write_tensors("adapter", adapter_state(net))
        writer.write_tensors("adapter_raw", adapter_state(net))
        writer.write_json("adapter_spec", model_spec(net))
        card = GeneratorCard(family="consistency", steps=0, adapter_of=base_manifest.ref, guidance=2.0, **space)
        lora = writer.commit(metrics=card.to_metrics())
    return base_manifest, lora


def test_one_replica_answers_the_lora_student_and_its_base_by_request(tmp_path):
    """The API selects the adapter per request: one network in memory, the adapter on or off."""
    from workers.generator import Generator, Request

    store, plain_ref = serve_bench.synthetic_store(str(tmp_path / "store"))
    vae_ref = store.get_ref(plain_ref).inputs[0]
    base, lora = commit_adapter(store, vae_ref)
    body = {"n": 2, "steps": 3, "seed": 11, "labels": [1, 10], "guidance": 1.0, "format": "array"}
    with serve_bench.plain_server(store.uri, lora.ref, 8, 5.0, 2, 2, 1.0, "cpu") as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            info = client.get("/v1/model").json()
            assert info["adapter_of"] == base.ref and info["family"] == "consistency"
            student = client.post("/v1/generate", json=body).json()
            teacher = client.post("/v1/generate", json={**body, "adapter": False}).json()
            both = client.post("/v1/generate", json={**body, "adapter": True}).json()
    assert (student["model"], student["family"], student["sampler"]) == (lora.ref, "consistency", "consistency")
    assert (teacher["model"], teacher["family"], teacher["sampler"]) == (base.ref, "flow", "euler")
    assert both["images"] == student["images"]  # true is the default
    # The base's answer is what the base alone draws: the adapter was off, and nothing else changed.
    alone = Generator.load(store, base).generate(
        Request(n=2, steps=3, sampler="euler", labels=(1, 10), guidance=1.0, seed=11)
    )
    np.testing.assert_array_equal(np.asarray(teacher["images"], np.uint8), alone.pixels)
    assert not np.array_equal(np.asarray(student["images"], np.uint8), alone.pixels)


def test_the_playground_switches_between_the_lora_student_and_its_base(tmp_path):
    import shutil

    import pytest

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install -y chromium) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser test")
    store, plain_ref = serve_bench.synthetic_store(str(tmp_path / "store"))
    base, lora = commit_adapter(store, store.get_ref(plain_ref).inputs[0])
    with serve_bench.plain_server(store.uri, lora.ref, 8, 5.0, 2, 2, 1.0, "cpu") as url:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_function("document.querySelector('#model-ref').textContent.includes('lora/')")
                assert page.is_visible("#adapter") and page.is_disabled("#guidance")  # the student takes none
                page.fill("#n", "2")
                page.click("#generate")
                page.wait_for_function(f"document.querySelector('#status').textContent.includes('from {lora.ref}')")
                page.select_option("#adapter", "off")
                assert page.is_enabled("#guidance")  # the base is a flow model: guidance applies
                page.fill("#steps", "4")
                page.click("#generate")
                page.wait_for_function(f"document.querySelector('#status').textContent.includes('from {base.ref}')")
                assert "4 step(s)" in page.inner_text("#status") and page.is_visible("#adapter")  # no reload
            finally:
                browser.close()
