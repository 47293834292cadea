"""Units the harness reports in."""

GIB = 2**30  # bytes in a GiB: every memory figure is in GiB
