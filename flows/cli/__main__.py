"""``python -m flows.cli`` runs the ``fewstep`` command line."""

from flows.cli import main

main()
