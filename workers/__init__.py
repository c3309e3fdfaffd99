"""Ray adapters: Ray Data stages, the Ray Train loop, the Ray Serve app (no Prefect)."""
