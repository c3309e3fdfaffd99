"""Errors the command line shows as one line (exit status 2) instead of a traceback."""


class UserError(Exception):
    """Something the user must fix: the message says what was wrong and what to do."""
