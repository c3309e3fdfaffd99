"""Configuration, the artifact store, table schemas and checkpoints (no Ray, no Prefect)."""
