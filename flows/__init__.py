"""Prefect flows and tasks, and the ``fewstep`` command line."""
