"""Exceptions shared across the harness."""


class Unsupported(Exception):
    """The case cannot run on this machine or with these packages; the message says which and why."""
