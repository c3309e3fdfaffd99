"""Option help texts shared by the commands."""

STORE_HELP = "Local folder or s3://bucket/prefix (default ./fewstep-store)."
PRESET_HELP = (
    "Config preset: quick (minutes, a smoke test), default (digits), shapes (the RGB benchmark, <= 60 min "
    "on 2 CPU cores), shapes-full (every method) or glyphs (shapes' settings on a second RGB set)."
)
RAY_HELP = "Attach to a running Ray cluster (default: start a local one)."
