"""Proto <-> domain for the messages every pipeserve server and client shares: sampling and
``GenerateRequest`` checks, workloads, split policies, tensors."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline_core import Policy, RequestError, SamplingParams, Workload

__all__ = [
    "check_generate",
    "generate_request",
    "policy_from_proto",
    "policy_to_proto",
    "sampling_from_proto",
    "tensor_from_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
    "workload_from_proto",
    "workload_to_proto",
]


def workload_from_proto(w: Any, device: str = "cpu", threads: int = 1) -> Workload:
    """A ``pipeline_core`` ``Workload`` from a ``pipeserve.v1.Workload`` (0 -> defaults)."""
    d = Workload()
    return Workload(
        batch=w.batch or d.batch,
        seq=w.seq or d.seq,
        chunks=w.chunks or d.chunks,
        kv_tokens=w.kv_tokens,
        device=device,
        threads=threads,
    )


def check_generate(req: Any) -> SamplingParams:
    """What can be checked of a ``GenerateRequest`` without the model (raises
    ``RequestError``): a prompt, sane numbers.  Ids against the vocabulary and lengths
    against the context are the stage-0 worker's to check."""
    if req.HasField("text"):
        if not req.text:
            raise RequestError("the text prompt is empty; give some text or token_ids")
    elif not req.token_ids.ids:
        raise RequestError("the prompt is empty; give text or at least one token id")
    for what, ids in (("prompt", req.token_ids.ids), ("resume_token_ids", req.resume_token_ids)):
        bad = [t for t in ids if t < 0]
        if bad:
            raise RequestError(f"{what}: token ids {bad[:5]} are negative")
    bad = [t for t in req.sampling.stop_token_ids if t < 0]
    if bad:
        raise RequestError(f"stop token ids {bad[:5]} are negative")
    params = sampling_from_proto(req)
    params.validate(1, None)
    return params


def sampling_from_proto(req: Any) -> SamplingParams:
    """``SamplingParams`` from a ``pipeserve.v1.GenerateRequest`` (proto defaults -> ours)."""
    s = req.sampling
    return SamplingParams(
        max_new_tokens=req.max_new_tokens or SamplingParams.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p or 1.0,
        repetition_penalty=s.repetition_penalty or 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        timeout_s=req.timeout_s or None,
    )


def generate_request(
    model: str,
    params: SamplingParams,
    *,
    token_ids: list[int] | None = None,
    text: str | None = None,
) -> Any:
    """A ``pipeserve.v1.GenerateRequest`` for ``model`` (the inverse of
    :func:`sampling_from_proto`): a prompt of ``token_ids`` or ``text``, decoded by ``params``."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    req = pb.GenerateRequest(model=model, max_new_tokens=params.max_new_tokens)
    if text is not None:
        req.text = text
    else:
        req.token_ids.ids.extend(token_ids or [])
    s = req.sampling
    s.temperature, s.top_k, s.top_p = params.temperature, params.top_k, params.top_p
    s.repetition_penalty = params.repetition_penalty
    if params.seed is not None:
        s.seed = params.seed
    s.stop_token_ids.extend(params.stop_token_ids)
    s.ignore_eos = params.ignore_eos
    if params.timeout_s:
        req.timeout_s = params.timeout_s
    return req


def workload_to_proto(w: Workload) -> Any:
    """A ``pipeserve.v1.Workload`` of ``w``'s batch, sequence, microbatches and KV tokens."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    return pb.Workload(batch=w.batch, seq=w.seq, chunks=w.chunks, kv_tokens=w.kv_tokens)


def policy_from_proto(p: Any) -> Policy:
    """The split policy of a ``pipeserve.v1.SplitPolicy``; ``balanced`` (by time) when none is
    set (``balanced=0``: one stage per idle worker)."""
    kind = p.WhichOneof("kind")
    if kind == "threshold_bytes":
        return Policy.threshold(p.threshold_bytes)
    if kind == "manual":
        return Policy.manual(list(p.manual.split_at))
    if kind == "equal_size":
        return Policy.equal_size(p.equal_size)
    return Policy.balanced(p.balanced)


def policy_to_proto(policy: Policy) -> Any:
    """A ``pipeserve.v1.SplitPolicy`` of ``policy`` (the inverse of :func:`policy_from_proto`;
    a balanced policy's worker memory and speeds are the coordinator's to find, not sent)."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    if policy.kind == "threshold":
        return pb.SplitPolicy(threshold_bytes=policy.max_bytes)
    if policy.kind == "manual":
        return pb.SplitPolicy(manual=pb.ManualSplit(split_at=list(policy.split_at)))
    if policy.kind == "equal_size":
        return pb.SplitPolicy(equal_size=policy.stages)
    if policy.kind == "balanced":
        return pb.SplitPolicy(balanced=policy.stages)
    raise ValueError(f"the {policy.kind} policy cannot be sent to a coordinator; use a plan file")


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def tensor_from_proto(t: Any) -> torch.Tensor:
    """A ``pipeserve.v1.Tensor`` as a torch tensor (raises ValueError on a mismatch)."""
    return tensor_from_bytes(t.data, t.dtype, list(t.shape), t.name)


def tensor_from_bytes(data: bytes, dtype: str, shape: list[int], name: str = "") -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"input {name!r}: unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
    dt = _DTYPES[dtype]
    n = math.prod(shape) if shape else 1
    if len(data) != n * dt.itemsize:
        raise ValueError(
            f"input {name!r}: {len(data)} bytes do not fit shape {shape} of {dtype} "
            f"({n * dt.itemsize} bytes)"
        )
    if n == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape)


def tensor_to_proto(name: str, t: torch.Tensor) -> Any:
    from pipeserve.v1 import pipeserve_pb2 as pb

    t = t.detach().cpu().contiguous()
    if t.dtype not in _NAMES:
        raise ValueError(f"output {name!r} has dtype {t.dtype}, which cannot be sent")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(name=name, dtype=_NAMES[t.dtype], shape=list(t.shape), data=data)
