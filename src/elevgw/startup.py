"""Start-up problems as one line: what is wrong, which option or variable, what to do.

``twistd`` prints its whole usage (70 lines) before a ``UsageError`` and a traceback for any
other exception, which hides the one line that matters. Option errors therefore leave as
``SystemExit`` with that line (``elevgw.tap``), and what can only fail once ``twistd`` has
started the service (binding a port) raises ``StartupError``, which ``one_line_errors``
prints without a traceback.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn


class StartupError(Exception):
    """The gateway cannot start; ``str()`` is the whole message for the operator."""


def exit_with(message: str) -> NoReturn:
    """Stop the process now with ``message`` on stderr and exit status 1."""
    raise SystemExit(f"elevgw: {message}")


def one_line_errors() -> None:
    """Make an uncaught ``StartupError`` print as one line, as the last thing the process does.

    ``twistd`` lets an exception from ``privilegedStartService`` end the process (after
    sending it to a daemon's parent and removing the pid file), so the interpreter's
    exception hook is what prints it. Other exceptions keep their traceback.
    """
    if getattr(sys.excepthook, "elevgw_one_line", False):
        return
    previous = sys.excepthook

    def excepthook(kind: Any, value: Any, traceback: Any) -> None:
        if isinstance(value, StartupError):
            sys.stderr.write(f"elevgw: {value}\n")
            sys.stderr.flush()
        else:
            previous(kind, value, traceback)

    excepthook.elevgw_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
