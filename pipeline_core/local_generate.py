"""Generation on this machine: stage processes on a ring, the scheduler in the caller.

``LocalGenerator(plan)`` spawns stages ``1..S-1`` (each loads only its shard), builds stage 0
and the :class:`~pipeline_core.engine.GenerationEngine` in this process, and joins the ring.
``gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=32))`` returns the new token ids;
``gen.submit(...)`` returns a handle that streams them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .engine import EngineLimits, GenerationEngine, RequestHandle
from .errors import PlanError
from .gen_stage import GenStage
from .load import ReadStats
from .plan import Plan
from .ring import CLOSED, Ring
from .ring_messages import RingMessage, decode, encode
from .sampling import SamplingParams
from .source import hf_tokenizer
from .stage_loop import serve_generation
from .stage_options import StageOptions
from .stage_procs import (
    StageProcesses,
    build_and_report,
    connect,
    memory_probe,
    root_log_level,
    stage_setup,
)

__all__ = ["InProcessRing", "LocalGenerator"]

log = logging.getLogger(__name__)


def _stage_main(
    plan_json: str,
    index: int,
    port: int,
    device: str,
    threads: int,
    timeout_s: float,
    log_level: int | str,
    options: StageOptions,
) -> None:
    stage_setup(threads, log_level)
    plan = Plan.from_json(plan_json)
    store = connect(port, plan.num_stages, timeout_s)

    def build(stats: ReadStats, probe: memory_probe) -> GenStage:
        probe.mark()
        return GenStage(
            plan,
            index,
            device,
            stats=stats,
            step_timing=options.step_timing,
            compile_decode=options.compile_decode,
            huge_pages=options.huge_pages,
        )

    stage = build_and_report(store, index, build)
    if stage is None:
        return
    ring = Ring(store, index, plan.num_stages, device, timeout_s, cuda_ipc=options.cuda_ipc)
    serve_generation(stage, ring, ahead=options.decode_ahead)


class _StageEnd:
    """A later stage's end of the in-process ring: its inbox, and the next stage's."""

    def __init__(self, nxt: queue.SimpleQueue[Any]) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._next = nxt

    def recv(self, timeout: float | None = None) -> RingMessage:
        return self.inbox.get(timeout=timeout)

    def waiting(self) -> bool:
        return not self.inbox.empty()

    def send(self, msg: RingMessage) -> None:
        self._next.put(decode(encode(msg)))  # each message as a Ring would carry it


class InProcessRing:
    """Stages ``1..S-1`` in the scheduler's own process, each on its own thread running the
    same :func:`serve_generation` loop as a stage process (decode ahead included), linked by
    queues; what the last one sends lands in stage 0's inbox -- for tests and debugging, where
    one process is faster than S and tracebacks stay in one place.  A stage loop that raises
    closes the ring (stage 0 fails its requests instead of waiting for a timeout)."""

    def __init__(self, stages: Sequence[GenStage], *, ahead: bool = True) -> None:
        self.stages = list(stages)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.timeout_s = 300.0
        self.bytes_sent = 0
        nxt, ends = self.inbox, []
        for _ in self.stages:
            ends.insert(0, _StageEnd(nxt))
            nxt = ends[0].inbox
        self._first = nxt
        for stage, end in zip(self.stages, ends, strict=True):
            name = f"stage-{stage.index}"
            threading.Thread(
                target=self._serve, args=(stage, end, ahead), name=name, daemon=True
            ).start()

    def _serve(self, stage: GenStage, end: _StageEnd, ahead: bool) -> None:
        try:
            serve_generation(stage, end, ahead=ahead)  # type: ignore[arg-type]
        except BaseException:
            log.exception("[stage %d] in-process stage loop failed", stage.index)
            self.inbox.put(CLOSED)

    def send(self, msg: RingMessage) -> None:
        self._first.put(decode(encode(msg)))


class LocalGenerator:
    """A plan's generation stages on this machine (see module docstring).

    Args:
        plan: the plan (any split policy); the model must be a HF causal LM or T5-like.
        devices: one device per stage (default: all ``cpu``).
        threads_per_stage: torch threads in each stage process and in this one.
        limits: the scheduler's KV budget and batching limits.
        in_process: every stage in this process (:class:`InProcessRing`: the same stage loop,
            a thread per later stage, no stage processes) -- for tests and debugging.
        log_level: the stage processes' logging level (default: this process's).
        options: step timing and CUDA IPC for every stage (the caller reads the environment:
            :func:`pipeserve.cli.flags.stage_options_from_env`).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        devices: list[str] | None = None,
        threads_per_stage: int = 1,
        limits: EngineLimits | None = None,
        timeout_s: float = 300.0,
        in_process: bool = False,
        log_level: int | str | None = None,
        options: StageOptions | None = None,
    ) -> None:
        n = plan.num_stages
        devices = devices or ["cpu"] * n
        if len(devices) != n:
            raise PlanError(f"{n} stages need {n} devices, got {len(devices)}")
        self.plan = plan
        opts = self.options = options or StageOptions()
        self.procs: dict[int, mp.process.BaseProcess] = {}
        self.stage_procs: StageProcesses | None = None
        self.engine: GenerationEngine | None = None
        self.stage_info: list[dict[str, Any]] = []
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads_per_stage)
        self.tokenizer = hf_tokenizer(plan.source.checkpoint)
        if in_process:
            try:
                stages = []
                for k in range(n):
                    stats, probe = ReadStats(), memory_probe()
                    probe.mark()
                    stages.append(
                        GenStage(
                            plan,
                            k,
                            devices[k],
                            stats=stats,
                            step_timing=opts.step_timing,
                            compile_decode=opts.compile_decode,
                            huge_pages=opts.huge_pages,
                        )
                    )
                    self.stage_info.append(probe.report(stats))
                ring = InProcessRing(stages[1:], ahead=opts.decode_ahead) if n > 1 else None
                self.engine = GenerationEngine(stages[0], ring, limits, opts.decode_ahead)
            except BaseException:
                torch.set_num_threads(self._saved_threads)
                raise
            return
        self.stage_procs = StageProcesses(n, timeout_s)
        self.store = self.stage_procs.store
        plan_json = json.dumps(plan.to_json())
        level = root_log_level() if log_level is None else log_level
        rest = (threads_per_stage, timeout_s, level, opts)
        self.stage_procs.start(
            _stage_main,
            {k: (plan_json, k, self.store.port, devices[k], *rest) for k in range(1, n)},
        )
        self.procs = self.stage_procs.procs
        try:
            stats, probe = ReadStats(), memory_probe()
            probe.mark()
            stage = GenStage(
                plan,
                0,
                devices[0],
                stats=stats,
                step_timing=opts.step_timing,
                compile_decode=opts.compile_decode,
                huge_pages=opts.huge_pages,
            )
            remote = self.stage_procs.wait_ready()
            self.stage_info = [probe.report(stats), *(remote[k] for k in sorted(remote))]
            ring = None
            if n > 1:
                ring = Ring(self.store, 0, n, devices[0], timeout_s, cuda_ipc=opts.cuda_ipc)
            self.engine = GenerationEngine(stage, ring, limits, opts.decode_ahead)
        except BaseException:
            self._kill()
            torch.set_num_threads(self._saved_threads)
            raise

    def _engine(self) -> GenerationEngine:
        if self.engine is None:
            raise RuntimeError("the generator is closed")
        return self.engine

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        resume: Sequence[int] = (),
    ) -> RequestHandle:
        return self._engine().submit(prompt_ids, params, resume)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        return self._engine().generate(prompts, params)

    def generate_text(self, prompt: str, params: SamplingParams | None = None) -> str:
        """Text in, text out, with the checkpoint's tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{self.plan.source.checkpoint} has no tokenizer; pass token ids instead"
            )
        ids = self.tokenizer(prompt)["input_ids"]
        return self.tokenizer.decode(self.generate([ids], params)[0], skip_special_tokens=True)

    def stats(self) -> list[dict[str, int]]:
        return self._engine().stats()

    def close(self) -> None:
        if self.engine is None:
            return
        engine, self.engine = self.engine, None
        try:
            engine.close()
        finally:
            if self.stage_procs is not None:
                self.stage_procs.close()
            torch.set_num_threads(self._saved_threads)

    def _kill(self) -> None:
        if self.stage_procs is not None:
            self.stage_procs.kill()

    def __enter__(self) -> LocalGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
