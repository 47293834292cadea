"""The exit codes of every ``flux2bench`` command (docs/layout.md lists when each is given)."""

EXIT_OK = 0  # every case has a result and none failed; compare: pass
EXIT_FAILED = 1  # a case failed (error, timeout, killed, drift_fail) or has no result; compare: a regression
EXIT_BAD_INPUT = 2  # the command stopped before doing anything (bad input, an unusable file or run directory)
EXIT_NOTHING_MEASURED = 3  # every case is unsupported on this machine, or this machine cannot run any
EXIT_INTERNAL = 4  # a defect of flux2bench: one line, and a log file with the traceback
EXIT_INTERRUPTED = 130  # run stopped by Ctrl-C (128 + SIGINT, as a shell reports it): resume later
EXIT_TERMINATED = 143  # run stopped by SIGTERM (128 + SIGTERM): resume later
