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
# Ctrl-C, as shells report it (128 + SIGINT): the run did not finish, whether or not it checkpointed first.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix; ``problems`` are printed one per line, ``hint`` says what to do next."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: list[str] | str, hint: str | None = None):
        self.source = source
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(source, problems, hint)  # args that rebuild the error (pickling, copying)

    def __str__(self) -> str:
        # What a notebook or a caller's log shows: the message and what to do (``report`` prints the same two
        # lines, without a traceback).
        return self.render() + (f"\nHint: {self.hint}" if self.hint else "")

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        return f"{self.source}: {len(self.problems)} problems\n" + "\n".join(
            f"  - {p}" for p in self.problems
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended the run, and the trainer has already said so (and where it checkpointed)."""


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
