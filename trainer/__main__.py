"""``python -m trainer --config PATH [--set key=value ...]``: the one entry point of training.

Used by ``launcher run``, by ``torchrun``/``accelerate launch``, and by the container in the pod.
Exit codes: 0 done, 1 failed, 2 bad config or input, 143 stopped by SIGTERM after a checkpoint (retry).
"""

from __future__ import annotations

import argparse
import sys

from trainer.errors import UserError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    args = parser.parse_args(argv)
    try:
        from trainer.config import check_paths, load_config

        cfg = load_config(args.config, args.set)
        check_paths(cfg)
        from trainer import api

        api.train(cfg)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
