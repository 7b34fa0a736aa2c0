"""``pipeserve local CKPT --stages 2 --http-port N`` as a subprocess for the gateway tests:
a tiny Llama with the demo tokenizer, a client token required, and the helpers the tests
share (not a test module)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import torch

from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .models import HF_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sk-pipeserve-test"
VOCAB = 320  # byte-level BPE: 256 bytes + specials + a few merges
PROMPT = "Hello world, the pipeline streams tokens"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONTEXT = 100_000  # positions; the workers' KV budget is 65536 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path):
    """A tiny Llama (weights redrawn at std 1 so greedy text does not repeat one token) with
    the demo's byte-level tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeserve.demo_tokenizer import save_demo_tokenizer

    cfg = {k: v for k, v in HF_CONFIGS["llama"].items() if k != "model_type"}
    # a long context, so a request can fit the context and still not the KV budget (429)
    config = AutoConfig.for_model(
        "llama", **{**cfg, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(path, max_shard_size="40KB")
    return model, save_demo_tokenizer(path, VOCAB)


class Local:
    """``pipeserve local CKPT --stages 2 --http-port N`` as a subprocess."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model, self.tok = tiny_checkpoint(tmp / "tiny")
        self.name = "tiny"
        self.http = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPESERVE_CLIENT_TOKEN": TOKEN}
        self.out = open(tmp / "local.out", "w+")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "pipeserve", "local", str(tmp / "tiny")),
                *("--stages", "2", "--port", "0", "--http-port", str(self.http)),
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
        )
        deadline = time.monotonic() + 600
        while "serving; Ctrl-C" not in (text := (tmp / "local.out").read_text()):
            assert self.proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.5)
        self.stdout = text
        self.address = re.search(r"coordinator (127\.0\.0\.1:\d+)", text).group(1)
        self.url = f"http://127.0.0.1:{self.http}/v1"
        self.channel = grpc.insecure_channel(self.address)
        self.inference = pbg.InferenceStub(self.channel)
        self.admin = pbg.AdminStub(self.channel)

    def client(self, key: str = TOKEN, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def grpc_text(self, req: pb.GenerateRequest) -> tuple[str, list[tuple[int, str]], pb.Usage]:
        """Text, (tokens, text) per response and usage of the gRPC path."""
        parts, usage = [], None
        for r in self.inference.Generate(req, metadata=AUTH, timeout=120):
            parts.append((len(r.token_ids), r.text))
            if r.finish_reason:
                usage = r.usage
        return "".join(t for _, t in parts), parts, usage

    def kv_sequences(self) -> list[int]:
        st = self.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        return [w.kv_sequences for w in st.workers]

    def close(self) -> None:
        self.proc.send_signal(2)  # Ctrl-C: run_local stops its children
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


def grpc_request(ids: list[int] | None = None, text: str | None = None, new: int = 24, **s):
    req = pb.GenerateRequest(model="tiny", max_new_tokens=new)
    if text is not None:
        req.text = text
    else:
        req.token_ids.ids.extend(ids)
    req.sampling.CopyFrom(pb.SamplingParameters(**s))
    return req


def wait_ready(port: int, want: int = 200) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == want:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.3)


def wait_kv_free(local: Local, timeout: float = 30) -> None:
    """Until no stage holds a KV cache row (heartbeats report them every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while (kv := local.kv_sequences()) != [0, 0]:
        assert time.monotonic() < deadline, kv
        time.sleep(0.2)
