"""``pipeserve local``: a coordinator and N stage workers on this machine, as separate
processes talking gRPC (control) and gloo (activations) exactly as on a real cluster; a model
loaded (by default a small demo Llama with random weights), its generation checked against
single-process ``transformers``, then served (optionally with the OpenAI HTTP gateway)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeserve.cli.connect import stubs
from pipeserve.cli.flags import DTYPE_HELP
from pipeserve.launch import LOOPBACK, Processes, free_port, wait_gateway, wait_status
from pipeserve.plan_table import format_plan
from pipeserve.reference import hf_greedy

__all__ = ["add_local_command", "check_forward", "cmd_local", "run_local"]

PROMPTS = [[11, 12, 13, 14, 15], [101, 102, 103], [7, 8, 9, 10, 11, 12, 13]]
NEW_TOKENS = 16


def _tiny_model(path: Path) -> Path:
    """A small random-init Llama saved as sharded safetensors, with a byte-level tokenizer
    and a chat template (built offline, once, then reused)."""
    from pipeserve.demo_tokenizer import save_demo_tokenizer

    if not (path / "tokenizer.json").is_file():  # also added to a cache built before it
        save_demo_tokenizer(path, vocab_size=1000)
    if (path / "model.safetensors.index.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="300KB")
    return path


def cmd_local(args: argparse.Namespace) -> int:
    """Coordinator + N workers on this machine, a model loaded, checked, then served."""
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        model_dir = _tiny_model(Path(args.cache))
        print(f"demo model: {model_dir} (a small Llama with RANDOM weights: tokens are noise)")
    if args.check_forward and not check_forward(model_dir, args.stages):
        return 1
    return run_local(
        model_dir,
        stages=args.stages,
        port=args.port,
        once=args.once,
        http_port=args.http_port,
        dtype=args.dtype or "",
        new_tokens=args.max_new_tokens,
    )


def check_forward(model_dir: Path, stages: int, batch: int = 6, seq: int = 32) -> bool:
    """pipeline_core's pipelined forward on local processes vs the single-process model."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline_core import LocalPipeline, ModelSource, Policy, make_plan

    plan = make_plan(ModelSource(checkpoint=str(model_dir)), Policy.balanced(stages))
    print(format_plan(plan), "\n")
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    with LocalPipeline(plan) as pipe:
        logits = pipe(input_ids=ids, attention_mask=mask, chunks=4)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    diff = (logits - expected).abs().max().item()
    print(
        f"pipelined forward ({stages} stages, batch {batch}x{seq}, 4 microbatches): "
        f"max |pipelined - single process| = {diff:.3g}"
    )
    return diff == 0


def _host_refusal(model_dir: Path, stages: int, dtype: str, new_tokens: int) -> str:
    """Why the stages cannot all load on this host (empty: they fit), known before any worker
    starts: a plan by bytes gives the weights and KV bytes per token of the model."""
    from pipeline_core import ModelSource, PlanError, Policy, Workload, make_plan
    from pipeline_core.host_memory import check_host_fits

    try:
        plan = make_plan(
            ModelSource(checkpoint=str(model_dir)),
            Policy.equal_size(stages),
            dtype=dtype or None,
            trace=False,
            workload=Workload(profile=False),
        )
        kv_tokens = sum(len(p) + new_tokens for p in PROMPTS)
        check_host_fits(plan, kv_tokens, processes=stages + 2)  # + coordinator, this process
    except (PlanError, FileNotFoundError) as e:
        return str(e)
    return ""


def run_local(
    model_dir: Path,
    *,
    stages: int = 3,
    port: int = 50051,
    once: bool = False,
    http_port: int = 0,
    dtype: str = "",
    new_tokens: int = NEW_TOKENS,
) -> int:
    """``dtype`` empty: the checkpoint's (the coordinator resolves it, as the reference's
    ``from_pretrained(dtype="auto")`` does).  The self-check's reference tokens are computed
    before any worker starts and the reference model is freed, so the host holds the model
    once at a time (the whole model, then its stages), not twice."""
    import grpc

    from pipeserve import rpc
    from pipeserve.v1 import pipeserve_pb2 as pb

    refusal = _host_refusal(model_dir, stages, dtype, new_tokens)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    prompts, expected = _reference_tokens(model_dir, dtype, new_tokens)
    port = free_port(port)
    address = f"127.0.0.1:{port}"
    log_dir = Path(".pipeserve-cache") / "logs"
    procs = Processes(log_dir)
    try:
        procs.start("coordinator", "coordinator", "--port", str(port), *LOOPBACK)
        grpc.channel_ready_future(rpc.channel(address)).result(timeout=120)
        for k in range(stages):
            procs.start(f"worker{k}", "worker", "--coordinator", address, *LOOPBACK)
        admin, inference = stubs(address)  # with PIPESERVE_ADMIN/CLIENT_TOKEN when set
        wait_status(
            admin,
            lambda st: len(st.workers) >= stages,
            what=f"workers did not register; see {log_dir}",
        )
        print(f"coordinator {address} and {stages} workers started (logs in {log_dir})")
        name = model_dir.name
        req = pb.LoadModelRequest(
            name=name,
            checkpoint=str(model_dir.resolve()),
            policy=pb.SplitPolicy(balanced=stages),
            dtype=dtype,
        )
        for p in admin.LoadModel(req, timeout=900):
            if p.done:
                for s in p.stages:
                    print(f"  stage {s.stage} on {s.worker_id}: {s.bytes_loaded} bytes, {s.state}")
        print(f"model {name!r} loaded over {stages} stages")
        ok = True
        for prompt, want in zip(prompts, expected, strict=True):
            got: list[int] = []
            g = pb.GenerateRequest(
                model=name,
                token_ids=pb.TokenIds(ids=prompt),
                max_new_tokens=new_tokens,
                sampling=pb.SamplingParameters(ignore_eos=True),
            )
            t0 = time.perf_counter()
            times: list[float] = []
            for r in inference.Generate(g, timeout=max(300, 60 * new_tokens)):
                got += list(r.token_ids)
                times += [time.perf_counter() - t0] * len(r.token_ids)
            ok &= got == want
            note = "" if got == want else f"   (single-process transformers: {want})"
            print(f"  prompt {prompt} -> {got}{note}")
            print(f"    {_timing(times)}")
        verdict = "same tokens as" if ok else "DIFFERENT tokens from"
        print(f"pipelined generation: {verdict} single-process transformers generate")
        ids = ",".join(map(str, prompts[0]))
        grpcurl = Path(sys.executable).parent / "grpcurl"
        body = f'{{"model":"{name}","token_ids":{{"ids":[{ids}]}},"max_new_tokens":8}}'
        print(
            "\ncall it:\n"
            f"  pipeserve generate --coordinator {address} --model {name} --prompt-ids {ids}\n"
            f"  pipeserve admin status --coordinator {address}\n"
            f"  {grpcurl if grpcurl.exists() else 'grpcurl'} -plaintext -d '{body}' {address} "
            "pipeserve.v1.Inference/Generate"
        )
        if http_port:
            http_port = free_port(http_port)  # the port asked for, or any free one
            procs.start(
                "gateway",
                "gateway",
                "--coordinator",
                address,
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
            )
            print_gateway(wait_gateway(http_port, log_dir), name)
        if once:
            return 0 if ok else 1
        print("\nserving; Ctrl-C to stop")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        procs.stop()


def _reference_tokens(
    model_dir: Path, dtype: str, new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """The self-check's prompts (inside the vocabulary) and the greedy tokens single-process
    ``transformers`` generates for them; the model is freed before returning."""
    import gc

    from pipeline_core.source import _hf_model_class, hf_config

    config = hf_config(model_dir)
    vocab = config.get_text_config(decoder=True).vocab_size
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    print(f"reference: single-process transformers generate of {len(prompts)} prompts ...")
    reference = _hf_model_class(config).from_pretrained(model_dir, dtype=dtype or "auto").eval()
    expected = [hf_greedy(reference, p, new_tokens) for p in prompts]
    del reference
    gc.collect()
    return prompts, expected


def _timing(times: list[float]) -> str:
    """First token and per-token seconds of one streamed request."""
    if not times:
        return "no tokens"
    per = (times[-1] - times[0]) / max(1, len(times) - 1)
    return f"first token {times[0]:.3f} s, then {per:.3f} s/token"


def print_gateway(url: str, model: str) -> None:
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"max_tokens": 16}'
    )
    print(
        f"\nOpenAI-compatible API: {url}/v1\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', "
        "api_key='none'); "
        f"print(c.completions.create(model='{model}', prompt='Hello', max_tokens=16)"
        '.choices[0].text)"'
    )


def add_local_command(sub: Any) -> None:
    p = sub.add_parser(
        "local", help="coordinator + workers on this machine: load, self-check, serve"
    )
    p.add_argument("model_dir", nargs="?", help="checkpoint (default: a small demo Llama)")
    p.add_argument("--cache", default=".pipeserve-cache/tiny-llama")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--port", type=int, default=50051, help="coordinator port (0: any free)")
    p.add_argument("--once", action="store_true", help="exit after the self-check")
    p.add_argument(
        "--http-port", type=int, default=0, help="also start the OpenAI HTTP gateway here"
    )
    p.add_argument(
        "--check-forward", action="store_true", help="also check the pipelined forward first"
    )
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=NEW_TOKENS,
        help="tokens generated per self-check prompt (compared to single-process transformers)",
    )
    p.set_defaults(func=cmd_local)
