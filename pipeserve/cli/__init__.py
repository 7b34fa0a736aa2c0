"""The ``pipeserve`` command line.

It is the top of the project, above the coordinator, the stage worker and the shared kit
(nothing below imports it); it alone reads the environment and prints.

* ``pipeserve plan MODEL_DIR [--stages 3 | --equal-size 3 | --threshold 500MB | --split-at a,b]
  [--batch 8 --seq 128 --chunks 4] [--json]`` -- per stage: bytes, KV bytes per token,
  estimated time; predicted throughput and bubble (``plan``)
* ``pipeserve local`` -- a coordinator and workers on this machine: load, self-check, serve
  (``local``)
* ``pipeserve run MODEL_DIR --stages N --prompt-ids 1,2,3 --max-new-tokens K`` -- one-shot
  pipelined generation on local stage processes (``run``)
* ``pipeserve coordinator | worker | certs`` -- the cluster's servers (``servers``)
* ``pipeserve admin ACTION`` and ``pipeserve generate`` -- clients of a coordinator
  (``admin``, ``client``)
* ``pipeserve gateway`` -- the OpenAI-compatible HTTP gateway (``pipeserve.gateway.cli``)

Flags several commands share are written once in ``flags``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline_core.profile_cache import PROFILE_CACHE_ENV, set_default_profile_cache

    set_default_profile_cache(os.environ.get(PROFILE_CACHE_ENV))  # plans, profiles, workers
    saved = os.environ.get("PIPESERVE_LOG")
    if args.cmd == "run":
        # a one-shot run reports a failure on one line: the stages' own warnings (a failed step
        # with its traceback) only under --debug; the stage processes read PIPESERVE_LOG
        level = "DEBUG" if args.debug else (saved or "ERROR")
        os.environ["PIPESERVE_LOG"] = level
    else:  # servers choose their own default level (INFO) from PIPESERVE_LOG when unset
        level = saved or "WARNING"
    logging.basicConfig(level=level.upper())
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `pipeserve admin status | head`: the reader left, that is all
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE, as a shell reports it
    finally:
        if args.cmd == "run":
            if saved is None:
                os.environ.pop("PIPESERVE_LOG", None)
            else:
                os.environ["PIPESERVE_LOG"] = saved


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the deployment tests parse the manifests' args with it)."""
    from pipeserve.cli.admin import add_admin_command
    from pipeserve.cli.client import add_generate_command
    from pipeserve.cli.local import add_local_command
    from pipeserve.cli.plan import add_plan_command
    from pipeserve.cli.run import add_run_command
    from pipeserve.cli.servers import add_server_commands
    from pipeserve.gateway.cli import add_gateway_command

    parser = argparse.ArgumentParser(prog="pipeserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_plan_command(sub)
    add_local_command(sub)
    add_run_command(sub)
    add_server_commands(sub)
    add_admin_command(sub)
    add_generate_command(sub)
    add_gateway_command(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
