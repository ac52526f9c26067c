"""User-facing errors: one line ``Error: <what>: <which>: <why>`` plus a ``Hint:``, no traceback.

Shared by the launcher and the trainer (torch-free). Set ``USERLOOP_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import os
import sys
import traceback

# Exit codes documented in the README.
EXIT_USAGE = 2  # bad config, bad input, bad command line
EXIT_FAILED = 1  # a run or job that failed


class UserError(Exception):
    """An error the user can fix; ``problems`` are printed one per line, ``hint`` says what to do next."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: list[str] | str, hint: str | None = None):
        self.source = source
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        return f"{self.source}: {len(self.problems)} problems\n" + "\n".join(
            f"  - {p}" for p in self.problems
        )


def report(err: BaseException, stream=None) -> int:
    """Print ``err`` for a human and return the exit code to use."""
    stream = stream or sys.stderr
    if os.environ.get("USERLOOP_DEBUG") == "1":
        traceback.print_exception(err, file=stream)
    if isinstance(err, UserError):
        print(f"Error: {err.render()}", file=stream)
        if err.hint:
            print(f"Hint: {err.hint}", file=stream)
        return err.exit_code
    print(f"Error: {type(err).__name__}: {err}", file=stream)
    print("Hint: rerun with USERLOOP_DEBUG=1 for the traceback", file=stream)
    return EXIT_FAILED
