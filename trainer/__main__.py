"""``python -m trainer --config PATH [--set key=value ...]``: the one entry point of training.

Used by ``launcher run``, by ``torchrun``/``accelerate launch``, and by the container in the pod.
Exit codes: 0 done, 1 failed, 2 bad config or input (or ``output_dir`` in use by another run), 130 stopped
by Ctrl-C (after a checkpoint of the last finished step, unless pressed twice; run the same command to
resume), 143 stopped by SIGTERM after a checkpoint (retry).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import sys
from collections.abc import Iterator

from trainer.errors import EXIT_INTERRUPTED, Interrupted, UserError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    args = parser.parse_args(argv)
    # The command to show in output_dir's lock and to say how to resume (``launcher run`` passes its own;
    # torchrun's options are not visible from here).
    launch = ["torchrun", "..."] if "TORCHELASTIC_RUN_ID" in os.environ else ["python"]
    given = os.environ.get("USERLOOP_COMMAND")
    os.environ.setdefault("USERLOOP_COMMAND", shlex.join([*launch, "-m", "trainer", *(argv or sys.argv[1:])]))
    try:
        return _train(args)
    finally:  # main() also runs in-process (tests, notebooks): this run's command must not outlive it
        if given is None:
            os.environ.pop("USERLOOP_COMMAND", None)


def _train(args: argparse.Namespace) -> int:
    try:
        with _no_gc_while_importing():
            from trainer.config import check_paths, load_config

            cfg = load_config(args.config, args.set)
            check_paths(cfg)
            import trainer.session  # noqa: F401  (torch, transformers, accelerate: most of the start-up)
            from trainer import api
        api.train(cfg)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):  # before the first step: the session had not taken Ctrl-C over yet
            print("interrupted (Ctrl-C) while starting: nothing to checkpoint", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


@contextlib.contextmanager
def _no_gc_while_importing() -> Iterator[None]:
    """Imports allocate millions of long-lived objects and free almost none: the cyclic GC's full
    collections during them find nothing and grow with the heap (6 of them, 0.8 s of an idle machine's
    start-up in issue 6's process profile; 1.3-2 s under load). Off while importing, then everything
    imported is frozen out of later collections, which then scan only what training allocates."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _exit(code: int) -> None:
    """Exit without tearing the interpreter down after a successful run.

    A run that returned 0 went through ``Session.finish``: checkpoints joined and fsynced, logs and wandb
    closed; the API worker, the event loop and the response cache closed by the algorithm loop; the last
    collective done. What is left is the interpreter unloading ~2,800 modules of torch and transformers:
    1.2-1.3 s after the last step (issue 6's process profile) that nobody waits for. torchrun's processes
    first leave the process group: left to the interpreter's teardown, its C++ threads could be destroyed
    still running ("terminate called without an active exception", SIGABRT) and torchrun then reported a
    finished run as failed (seen in the two-process SGLang test). A failed run exits normally (its atexit
    hooks, wandb's among them, may still have work).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                with contextlib.suppress(Exception):  # the run is done and saved: its exit code stays 0
                    dist.destroy_process_group()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
