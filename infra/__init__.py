"""Configuration, the artifact store, table schemas and checkpoints (no Ray, no Prefect).

``CODE_VERSION`` (see :mod:`infra.version`) is mixed into every stage key.
"""

from infra.version import CODE_VERSION

__all__ = ["CODE_VERSION"]
