"""The console of a command run on every rank: fr_distill's log lines on stdout, INFO from
rank 0 only, so that N ranks print one log and not N."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("fr_distill")


def setup_console(is_main: bool) -> None:
    """INFO lines from rank 0, warnings and errors from every rank, on stdout."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
