"""What the stage benchmarks share: synthetic image sources and untrained models committed to a store.

Timings depend on the architecture and the data's shape, not on the weights, so the models
here are untrained; the images are random RGB or grey noise (every one distinct, so a
Parquet source's content ids never collide).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def image_parquet(
    folder: str, n: int, size: int = 16, channels: int = 3, seed: int = 0, rows_per_file: int = 10_000
) -> str:
    """A folder of Parquet files with ``n`` distinct noise PNGs (column ``image``) and labels 0..9.

    Written in files of ``rows_per_file`` rows (memory stays at one file); reused when present.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = Path(folder) / "_complete"
    if done.exists():
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, rows_per_file):
        count = min(rows_per_file, n - start)
        pixels = rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)
        images = [png_bytes(p) for p in pixels]
        labels = (np.arange(start, start + count) % 10).astype(np.int64)
        pq.write_table(pa.table({"image": images, "label": labels}), f"{folder}/part-{start:09d}.parquet")
    done.write_text(str(n))
    return folder


def commit_vae(store, channels: int = 1, image_size: int = 16, base_channels: int = 32, latent_channels: int = 4):
    """An untrained VAE (4x downsampling) committed as a vae stage output; returns its manifest."""
    import torch

    from infra.cards import VAECard
    from models.registry import model_spec
    from models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(
        VAEConfig(in_channels=channels, latent_channels=latent_channels, base_channels=base_channels, downsample=4)
    )
    side = image_size // 4
    with store.begin("vae", f"bench-{channels}-{image_size}-{base_channels}", config={"bench": True}) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        card = VAECard(
            latent_scale=1.0,
            latent_shape=(latent_channels, side, side),
            in_channels=channels,
            image_size=image_size,
            latent_channels=latent_channels,
            downsample=4,
            recon_mse_train=0.0,
            measured_on=0,
        )
        return writer.commit(metrics=card.to_metrics())


def commit_generator(store, vae, family: str = "flow", model: str = "DiT-T/2", latent=(4, 4, 4), num_classes: int = 10):
    """An untrained DiT committed as a base (flow) or consistency output; returns its manifest."""
    import torch

    from infra.cards import GeneratorCard
    from models.dit import DiT, dit_config
    from models.registry import model_spec

    torch.manual_seed(0)
    net = DiT(dit_config(model, input_size=latent[1], in_channels=latent[0], num_classes=num_classes))
    stage = "base" if family == "flow" else "consistency"
    with store.begin(stage, f"bench-{family}", config={"bench": True}, inputs=[vae]) as writer:
        writer.write_model("model", net, model_spec(net))
        writer.write_model("raw", net, model_spec(net))
        card = GeneratorCard(
            family=family,
            steps=0,
            latent_shape=tuple(latent),
            num_classes=num_classes,
            latent_scale=1.0,
            vae_ref=vae.ref,
        )
        return writer.commit(metrics=card.to_metrics())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemoryPeaks:
    """Peaks of this process's resident memory by kind, sampled every ``every_s`` in a thread:
    ``anon`` (its own heap: what grows if it collects data) and ``shmem`` (shared pages it has
    touched, e.g. Ray's object store mapped in while reading blocks; they belong to the store,
    whose size is capped). VmHWM alone adds both.

        with MemoryPeaks() as peaks:
            ...
        peaks.mb  # {"anon": ..., "file": ..., "shmem": ...}
    """

    KINDS = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}

    def __init__(self, every_s: float = 0.1):
        import threading

        self.every_s, self.mb = every_s, {kind: 0.0 for kind in self.KINDS.values()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for line in open("/proc/self/status"):
            kind = self.KINDS.get(line.split(" ", 1)[0].split("\t", 1)[0])
            if kind:
                self.mb[kind] = max(self.mb[kind], int(line.split()[1]) / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> MemoryPeaks:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
