"""Exceptions shared across the harness."""


class Unsupported(Exception):
    """The case cannot run on this machine or with these packages; the message says which and why."""


class MachineLacks(Unsupported):
    """The case cannot run on this machine (no GPU visible, too few GPUs, no cgroup v2, a missing package or
    kernel): a fact about the machine, not a result about the setup, so a resume on a machine that has what it
    needs runs the case again."""
