"""The generation data plane: stages in a ring over ``torch.distributed``.

Stage ``k`` sends to stage ``k+1``; the last stage sends the chosen token ids back to stage 0,
which runs the scheduler -- no driver in between.  Each edge is its own two-rank process group
(NCCL between two GPUs; two stages sharing one GPU: gloo carrying CUDA IPC handles, so the
activations stay on the GPU -- see :mod:`~pipeline_core.colocate`; else gloo through host
memory: CPU stages), created in
ascending edge order so start-up cannot deadlock.

A send completes only once the receiver has posted its receive, so someone must keep a receive
posted on every edge, else a ring of stages each sending would deadlock.  On stage 0 a thread
does (it receives and queues the messages in ``inbox``, which stage 0's scheduler also takes
its own commands from).  A later stage over gloo instead keeps its next message's first-frame
receive posted itself and waits on it in :meth:`Ring.recv` -- no thread, no queue: each hop
woke three sleeping threads (gloo's, the receiving one, the stage's), ~0.1 ms more a hop on a
stage that had been idle (issue 23).  Its sends can still not deadlock: a receive is posted
whenever it is not taking a message, and the chain of stages waiting on a send ends at stage
0's thread, which always takes them.  NCCL and CUDA-IPC edges keep the thread (an NCCL receive
posted ahead would hold a kernel on the GPU).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist

from .colocate import EdgeKind, IpcChannel, choose_edge
from .ring_messages import RingMessage, Stop, decode, encode
from .transport import Channel, Posted, device_identity, gloo_group, nccl_group, use_device

__all__ = ["CLOSED", "Ring", "RingClosed"]

log = logging.getLogger(__name__)


class RingClosed:
    """Put in a stage's inbox when its inbound edge broke (the previous stage is gone)."""


CLOSED = RingClosed()


def _scoped(store: dist.Store, prefix: str) -> dist.Store:
    """Keys of ``store`` under ``prefix`` (a store may scope itself: torch's PrefixStore cannot
    wrap a store implemented in Python)."""
    scoped = getattr(store, "prefixed", None)
    return scoped(prefix) if scoped is not None else dist.PrefixStore(prefix, store)


class Ring:
    """Stage ``index`` of ``num_stages`` on the ring (``num_stages == 1``: no transport)."""

    def __init__(
        self,
        store: dist.Store,
        index: int,
        num_stages: int,
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
        *,
        cuda_ipc: bool = True,
    ) -> None:
        """``cuda_ipc=False``: two stages sharing one GPU send through host memory instead
        (either end can turn it off; see :func:`~pipeline_core.colocate.choose_edge`)."""
        self.index, self.num_stages = index, num_stages
        self.timeout_s = timeout_s
        # SimpleQueue (C): a handoff costs ~8 us of CPU here against ~30 for queue.Queue's
        # Python condition variable, paid once per hop (issue 23)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._out: Channel | IpcChannel | None = None
        self._in: Channel | IpcChannel | None = None
        self._thread: threading.Thread | None = None
        self._posted: Posted | None = None
        """A later stage over gloo: its next message's receive, posted (see module docstring)."""
        plain_in = False
        if num_stages == 1:
            return
        device = torch.device(device)
        use_device(device)
        out_edge, in_edge = index, (index - 1) % num_stages
        for edge in sorted({out_edge, in_edge}):
            prefix = _scoped(store, f"ring/{edge}")
            rank = 0 if edge == out_edge else 1
            kind = choose_edge(prefix, rank, device_identity(device), cuda_ipc)
            ch: Channel | IpcChannel
            if kind is EdgeKind.NCCL:
                ch = Channel(nccl_group(prefix, rank, 2, timeout_s), device)
            elif kind is EdgeKind.CUDA_IPC:  # one GPU, two processes: no host round trip
                ch = IpcChannel(Channel(gloo_group(prefix, rank, 2, timeout_s)), device)
            else:
                ch = Channel(gloo_group(prefix, rank, 2, timeout_s))
            log.info("[stage %d] ring edge %d: %s", index, edge, kind)
            if edge == out_edge:
                self._out = ch
            if edge == in_edge:
                self._in = ch
                plain_in = kind in (EdgeKind.GLOO, EdgeKind.LOCAL)
        if index > 0 and plain_in:
            assert isinstance(self._in, Channel)
            self._posted = self._in.post(0)  # the sender is rank 0 of the inbound edge
        else:
            self._thread = threading.Thread(target=self._receive, name="ring-recv", daemon=True)
            self._thread.start()

    def _receive(self) -> None:
        assert self._in is not None
        try:
            while True:
                msg = decode(self._in.recv(0))  # the sender is rank 0 of the inbound edge
                self.inbox.put(msg)
                if isinstance(msg, Stop):
                    return
        except Exception as e:
            log.warning("[stage %d] ring receive ended: %s", self.index, e)
            self.inbox.put(CLOSED)

    def send(self, msg: RingMessage) -> None:
        """Send one message to the next stage (for the last stage: to stage 0)."""
        assert self._out is not None
        self._out.send(encode(msg), 1)
        self._out.flush()

    @property
    def bytes_sent(self) -> int:
        return self._out.bytes_sent if self._out is not None else 0

    def recv(self, timeout: float | None = None) -> RingMessage | None:
        """The next inbound message; None when ``timeout`` passes; raises when the ring broke.
        A stage that receives itself (see module docstring) waits without a timeout: gloo
        closes the edge when a wait times out."""
        if self._thread is None and self.num_stages > 1:
            if timeout is not None:
                raise ValueError(f"stage {self.index} receives without a timeout")
            return self._take()
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(msg, RingClosed):
            raise ConnectionError(f"stage {self.index}: the previous stage is gone")
        return msg

    def _take(self) -> RingMessage:
        """The posted message (then the next one's receive posted, unless it ended the ring)."""
        posted, self._posted = self._posted, None
        if posted is None:
            raise ConnectionError(f"stage {self.index}: the ring was stopped or broke")
        assert isinstance(self._in, Channel)
        try:
            msg = decode(self._in.take(posted))
        except Exception as e:
            log.warning("[stage %d] ring receive ended: %s", self.index, e)
            raise ConnectionError(f"stage {self.index}: the previous stage is gone ({e})") from e
        if not isinstance(msg, Stop):
            self._posted = self._in.post(0)
        return msg

    def waiting(self) -> bool:
        """Whether a message is known to be here already (one received by this stage itself
        may be, unseen: gloo tells only on a wait)."""
        return not self.inbox.empty()
