"""``python -m trainer.torchrun ARGS``: ``torchrun ARGS`` as ``launcher run --nproc N`` runs it, with the exit code
the trainer chose and no traceback.

torchrun starts each worker in a session of its own and forwards SIGINT and SIGTERM to them, so a Ctrl-C the
launcher passes on reaches every worker once: they finish or abandon the step, checkpoint and exit 130
(143 after SIGTERM). torchrun itself then ends with an uncaught ``SignalException`` (exit 1 and a traceback),
and a worker that failed alone ends it with ``ChildFailedError`` (exit 1 and a traceback, whatever the
worker's code: 2 for a bad input). Here the first ends with 128 + the signal and the second with the first
failed worker's code, which has printed its own ``Error:`` line. A second Ctrl-C makes torchrun send SIGTERM:
a worker stopping for Ctrl-C takes that as "stop at once" (``trainer.session``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # a negative code is the signal that killed the worker
    return 0


if __name__ == "__main__":
    sys.exit(main())
