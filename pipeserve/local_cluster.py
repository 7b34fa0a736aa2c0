"""``pipeserve local``: a coordinator and N stage workers on this machine, as separate
processes talking gRPC (control) and gloo (activations) exactly as on a real cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["hf_greedy", "run_local"]

PROMPTS = [[11, 12, 13, 14, 15], [101, 102, 103], [7, 8, 9, 10, 11, 12, 13]]
NEW_TOKENS = 16


def _free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    """The ``new`` tokens single-process ``transformers`` ``generate`` picks greedily (the
    reference pipelined generation must equal; also used by the tests)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
        )
    start = 1 if model.config.is_encoder_decoder else len(prompt)
    return out[0, start:].tolist()


def _host_refusal(model_dir: Path, stages: int, dtype: str) -> str:
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
        kv_tokens = sum(len(p) + NEW_TOKENS for p in PROMPTS)
        check_host_fits(plan, kv_tokens, processes=stages + 1)  # + the coordinator
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
) -> int:
    """``dtype`` empty: the checkpoint's (the coordinator resolves it, as the reference's
    ``from_pretrained(dtype="auto")`` does)."""
    import grpc

    from pipeserve import rpc
    from pipeserve.v1 import pipeserve_pb2 as pb

    refusal = _host_refusal(model_dir, stages, dtype)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    port = _free(port)
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_dir = Path(".pipeserve-cache") / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 -- lives as long as the child
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeserve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )

    try:
        common = ["--host", "127.0.0.1", "--advertise-host", "127.0.0.1"]
        start("coordinator", "coordinator", "--port", str(port), *common)
        ch = rpc.channel(address)
        grpc.channel_ready_future(ch).result(timeout=120)
        for k in range(stages):
            start(f"worker{k}", "worker", "--coordinator", address, *common)
        from pipeserve.cluster_cli import _stubs

        admin, inference = _stubs(address)  # with PIPESERVE_ADMIN/CLIENT_TOKEN when set
        deadline = time.monotonic() + 120
        while len(admin.ClusterStatus(pb.ClusterStatusRequest()).workers) < stages:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not register; see {log_dir}")
            time.sleep(0.2)
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
        from pipeline_core.source import _hf_model_class, hf_config

        config = hf_config(model_dir)
        reference = _hf_model_class(config).from_pretrained(model_dir, dtype=dtype or "auto").eval()
        vocab = config.get_text_config(decoder=True).vocab_size
        prompts = [[t % vocab for t in p] for p in PROMPTS]
        ok = True
        for prompt in prompts:
            got: list[int] = []
            g = pb.GenerateRequest(
                model=name,
                token_ids=pb.TokenIds(ids=prompt),
                max_new_tokens=NEW_TOKENS,
                sampling=pb.SamplingParameters(ignore_eos=True),
            )
            for r in inference.Generate(g, timeout=300):
                got += list(r.token_ids)
            want = hf_greedy(reference, prompt, NEW_TOKENS)
            ok &= got == want
            note = "" if got == want else f"   (single-process transformers: {want})"
            print(f"  prompt {prompt} -> {got}{note}")
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
            http_port = _free(http_port)  # the port asked for, or any free one
            start(
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
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_gateway(port: int, log_dir: Path, timeout: float = 120) -> str:
    """The gateway's base URL once its ``/ready`` answers 200 (raises TimeoutError)."""
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not start on port {port}; see {log_dir}")
        time.sleep(0.2)


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
