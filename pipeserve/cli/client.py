"""``pipeserve generate``: one generation through the coordinator, streamed as it comes."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pipeserve.cli.connect import report_rpc_error, stubs
from pipeserve.cli.flags import (
    add_sampling_flags,
    add_tls_flags,
    apply_tls,
    parse_ids,
    sampling_from_args,
)
from pipeserve.codec import generate_request

__all__ = ["add_generate_command", "cmd_generate"]


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from pipeserve.v1 import pipeserve_pb2 as pb

    apply_tls(args)
    _, inference = stubs(args.coordinator)
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    ids = None if args.prompt_ids is None else parse_ids(args.prompt_ids)
    req = generate_request(args.model, sampling_from_args(args), token_ids=ids, text=args.prompt)
    ids: list[int] = []
    text = ""
    t0 = time.perf_counter()
    try:
        for r in inference.Generate(req, timeout=args.timeout):
            ids += list(r.token_ids)
            text += r.text
            if not args.json:
                print(
                    r.text if r.text else " ".join(map(str, r.token_ids)) + " ", end="", flush=True
                )
            if r.finish_reason:
                finish, usage = pb.FinishReason.Name(r.finish_reason), r.usage
    except grpc.RpcError as e:
        if not args.json:
            print()
        return report_rpc_error(e)
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": ids,
                    "text": text,
                    "finish_reason": finish.removeprefix("FINISH_REASON_").lower(),
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                    },
                    "seconds": time.perf_counter() - t0,
                }
            )
        )
    else:
        print()
    return 0


def add_generate_command(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate through the coordinator (client)")
    p.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt")
    p.add_argument("--prompt-ids", metavar="1,2,3")
    add_sampling_flags(p)
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--json", action="store_true")
    add_tls_flags(p)
    p.set_defaults(func=cmd_generate)
