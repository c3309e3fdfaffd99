"""Option help texts shared by the commands."""

STORE_HELP = "Local folder or s3://bucket/prefix (default ./fewstep-store)."
PRESET_HELP = "Config preset: quick (minutes, a smoke test) or default (quality)."
RAY_HELP = "Attach to a running Ray cluster (default: start a local one)."
