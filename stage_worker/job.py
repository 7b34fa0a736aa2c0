"""One stage assignment on a worker: load the stage's tensors (in the background, counting
bytes), join the data-plane ring or mesh through the rendezvous store, and run -- stage 0 of
a generation model also runs the scheduler; the last stage of a forward model hosts the
driver.  No gRPC here beyond the request messages it reads: ``server`` is the servicer."""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

from pipeline_core import GenStage, ReadStats, RequestError
from pipeline_core.detokenize import Detokenizer
from pipeline_core.engine import EngineLimits, GenerationEngine, serve_generation
from pipeline_core.microbatch import check_chunks
from pipeline_core.plan import Plan
from pipeline_core.ring import Ring
from pipeline_core.runtime import DRIVER, Driver, RankMap, make_mesh, serve_stage
from pipeline_core.source import hf_tokenizer
from pipeline_core.stage import build_stage
from pipeline_core.stage_options import StageOptions
from pipeserve.codec import sampling_from_proto
from pipeserve.v1 import pipeserve_pb2 as pb
from stage_worker.rendezvous import CoordinatorStore

__all__ = ["BYTES_PER_TOKEN", "DATAPLANE_TIMEOUT_S", "StageJob", "check_text_size"]

log = logging.getLogger(__name__)

DATAPLANE_TIMEOUT_S = 60.0
"""Default data-plane (gloo/NCCL) timeout: a peer stuck this long fails the operation (the
command line takes it from ``PIPESERVE_DATAPLANE_TIMEOUT``)."""


class StageJob:
    """One assignment: the stage, its ring, and (stage 0) the scheduler.

    ``dataplane_timeout``: seconds before a stuck gloo/NCCL operation (or the rendezvous)
    fails; ``options``: step timing and CUDA IPC for a generation stage;
    ``registry``/``metadata``: the coordinator's Registry stub and the worker's credentials,
    for the default rendezvous store.
    """

    def __init__(
        self,
        req: pb.AssignRequest,
        device: str,
        limits: EngineLimits,
        on_ready: Any,
        registry: Any = None,
        metadata: Any = None,
        dataplane_timeout: float = DATAPLANE_TIMEOUT_S,
        options: StageOptions | None = None,
    ) -> None:
        self.req = req
        self.options = options or StageOptions()
        self.timeout = dataplane_timeout
        self.registry, self.metadata = registry, metadata
        self.limits = limits
        self.on_ready = on_ready
        self.device = req.device or device
        self.plan = Plan.from_json(req.plan_json)
        if not 0 <= req.stage < self.plan.num_stages:
            raise RequestError(
                f"stage index {req.stage} is out of range: the plan has "
                f"{self.plan.num_stages} stages"
            )
        self.stats = ReadStats()
        self.bytes_total = self.plan.stages[req.stage].nbytes
        self.state = "loading"
        self.error = ""
        self.stage: Any = None  # GenStage (generate) or Stage (forward)
        self.engine: GenerationEngine | None = None
        self.driver: Driver | None = None
        self.ring: Ring | None = None
        self.forward_lock = threading.Lock()
        self.tokenizer: Any = None
        self.thread = threading.Thread(target=self._run, name="stage-job", daemon=True)
        self.done = threading.Event()

    def _store(self) -> dist.Store:
        if self.req.rendezvous:  # a TCPStore somewhere
            host, port = self.req.rendezvous.rsplit(":", 1)
            timeout = datetime.timedelta(seconds=self.timeout)
            store: dist.Store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
            return dist.PrefixStore(f"{self.req.model}/{self.req.epoch}", store)
        # the coordinator's Registry store (default)
        store = CoordinatorStore(self.registry, self.metadata, self.timeout)
        return store.prefixed(f"{self.req.model}/{self.req.epoch}")

    def _run(self) -> None:
        try:
            if self.req.mode == "forward":
                self._run_forward()
            else:
                self._run_generate()
        except Exception as e:  # reported through Status and health
            log.exception("stage job failed")
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def _run_forward(self) -> None:
        """Traced stage of any model; the last stage hosts the driver (fill-drain)."""
        req, n = self.req, self.req.world_size
        self.stage = build_stage(
            self.plan, req.stage, self.device, stats=self.stats, huge_pages=self.options.huge_pages
        )
        self.state = "joining"
        ranks = RankMap(n, driver_hosts_last=True)
        if req.stage == n - 1:
            mesh = make_mesh(self._store(), ranks, DRIVER, self.device, self.timeout)
            self.driver = Driver(mesh, self.stage.args, self.stage.outputs, hosted=self.stage)
            self.state = "ready"
            self.on_ready()
        else:
            mesh = make_mesh(self._store(), ranks, req.stage, self.device, self.timeout)
            self.state = "ready"
            self.on_ready()
            serve_stage(self.stage, mesh)  # until the driver sends STOP

    def forward(self, inputs: dict[str, torch.Tensor], chunks: int) -> Any:
        assert self.driver is not None
        names = [s.name for s in self.plan.inputs]
        unknown = sorted(set(inputs) - set(names))
        missing = [n for n in self.driver.input_names if n not in inputs]
        if unknown or missing:
            raise ValueError(f"inputs {unknown or missing} do not match the model's {names}")
        for spec in self.plan.inputs:
            if spec.name in inputs:
                spec.check(inputs[spec.name])
        mixed = self.plan.rows_mixed
        chunks = chunks or (1 if mixed else self.req.world_size)
        check_chunks(chunks, mixed)
        with self.forward_lock:  # one fill-drain pass at a time
            try:
                return self.driver.run(inputs, chunks)
            except RuntimeError as e:  # a stage's forward raised on this input: it failed alone
                raise RequestError(f"the model rejected the input: {e}") from e

    def submit(self, request: pb.GenerateRequest) -> tuple[Any, Detokenizer | None]:
        """Admit one ``GenerateRequest`` on stage 0 (raises ``RequestError``/``ValueError``):
        its handle, and a detokenizer when the model has a tokenizer.  A replay after a lost
        worker continues after what was streamed (``resume_token_ids``)."""
        assert self.engine is not None
        tok = self.tokenizer
        params = sampling_from_proto(request)
        if request.HasField("text"):
            if tok is None:
                raise ValueError("the model has no tokenizer; send token_ids instead of text")
            check_text_size(request.text, self.engine)  # before the tokenizer sees it
            prompt = tok(request.text)["input_ids"]
        else:
            prompt = list(request.token_ids.ids)
        handle = self.engine.submit(prompt, params, resume=list(request.resume_token_ids))
        log.info("request %d admitted: %d prompt tokens", handle.id, len(prompt))
        return handle, Detokenizer(tok) if tok is not None else None

    def _run_generate(self) -> None:
        req = self.req
        opts = self.options
        self.stage = GenStage(
            self.plan,
            req.stage,
            self.device,
            stats=self.stats,
            step_timing=opts.step_timing,
            compile_decode=opts.compile_decode,
            huge_pages=opts.huge_pages,
        )
        self.state = "joining"
        store = self._store()
        ring = Ring(
            store, req.stage, req.world_size, self.device, self.timeout, cuda_ipc=opts.cuda_ipc
        )
        self.ring = ring
        if req.stage == 0:
            ring_ = ring if req.world_size > 1 else None
            self.engine = GenerationEngine(self.stage, ring_, self.limits, opts.decode_ahead)
            self.tokenizer = hf_tokenizer(self.plan.source.checkpoint)
            self.state = "ready"
            self.on_ready()
        else:
            self.state = "ready"
            self.on_ready()
            serve_generation(self.stage, ring, ahead=opts.decode_ahead)  # until STOP

    def status(self) -> dict[str, Any]:
        kv = {}
        if isinstance(self.stage, GenStage) and self.state == "ready":
            kv = self.stage.cache_stats()
        return {
            "state": self.state,
            "model": self.req.model,
            "stage": self.req.stage,
            "bytes_loaded": self.stats.total_bytes,
            "bytes_total": self.bytes_total,
            "error": self.error,
            "epoch": self.req.epoch,
            "kv_sequences": kv.get("sequences", 0),
            "kv_bytes": kv.get("bytes", 0),
        }

    def metrics(self) -> dict[str, Any] | None:
        st = self.stage
        if not isinstance(st, GenStage):
            return None
        kv = st.cache_stats()
        return {
            "model": self.req.model,
            "stage": self.req.stage,
            "queue": self.engine.queue_depth if self.engine is not None else 0,
            "sequences": kv["sequences"],
            "kv": kv["bytes"],
            "kv_tokens": kv["tokens"],
            "compute": st.busy_s,
            "wait": st.wait_s,
            "send": st.send_s,
            "steps": st.steps,
            "bytes_sent": self.ring.bytes_sent if self.ring is not None else 0,
        }

    def abandon(self) -> None:
        """Drop the stage at once (a peer is gone): fail this stage's requests, send nothing.
        Threads blocked on the dead data plane end at its timeout."""
        if self.engine is not None:
            self.engine.abandon("the pipeline lost a worker; the coordinator replays requests")
        self.stage = self.engine = self.driver = None

    def release(self) -> None:
        if self.engine is not None:
            self.engine.close()  # STOP goes round the ring; other stages' loops end
        if self.driver is not None:
            self.driver.stop()  # the forward stages' loops end
        self.done.wait(timeout=30)
        self.stage = self.engine = self.driver = None


BYTES_PER_TOKEN = 32
"""A text prompt may have this many UTF-8 bytes per token the model could take: far more
than any tokenizer's tokens hold on average, and it bounds the tokenizer's time and memory."""


def check_text_size(text: str, engine: GenerationEngine) -> None:
    """Refuse a text prompt too long for the model before it is tokenized (a 20 MB text took
    30 s and 2.6 GB to tokenize just to be refused)."""
    tokens = min(engine.context_limit, engine.limits.max_tokens)
    limit = max(4096, int(tokens) * BYTES_PER_TOKEN)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise RequestError(
            f"the text prompt is {size} bytes; this model takes at most {limit} "
            f"({BYTES_PER_TOKEN} per token of its {int(tokens)}-token limit): shorten it"
        )
