"""Per-process choices for a generation stage, passed in from the edge.

``pipeline_core`` reads no environment: the CLI and the stage worker build
:class:`StageOptions` from ``PIPESERVE_STEP_TIMING`` / ``PIPESERVE_CUDA_IPC`` /
``PIPESERVE_COMPILE_DECODE`` / ``PIPESERVE_DECODE_AHEAD`` / ``PIPESERVE_HUGE_PAGES``
(:func:`pipeserve.cli.flags.stage_options_from_env`) and hand it to
:class:`~pipeline_core.local_generate.LocalGenerator` or the stage job, which pass
``step_timing`` and ``compile_decode`` to :class:`~pipeline_core.gen_stage.GenStage` and
``cuda_ipc`` to :class:`~pipeline_core.ring.Ring`, ``decode_ahead`` to
:func:`~pipeline_core.stage_loop.serve_generation`, ``huge_pages`` to the stage's loader
(stage processes get them through their arguments).
"""

from __future__ import annotations

from dataclasses import dataclass

from .compiled_step import CompileSettings

__all__ = ["StageOptions"]


@dataclass(frozen=True, slots=True)
class StageOptions:
    step_timing: bool = False
    """Keep the per-step time breakdown (:mod:`.step_timing`); off, it costs nothing."""
    cuda_ipc: bool = True
    """Two stages sharing one GPU pass CUDA IPC handles (:mod:`.colocate`); False on either end
    of an edge sends through host memory instead."""
    compile_decode: CompileSettings | None = None
    """Compile the stages' decode steps (:mod:`.compiled_step`); None: eager."""
    decode_ahead: bool = True
    """Later stages run a lone group's next decode step up to where its payload comes in
    before the step arrives (:mod:`.decode_ahead`)."""
    huge_pages: bool = True
    """A stage's weights on the CPU go into one region backed by huge pages
    (:mod:`.host_arena`); False: each tensor in its own allocation."""
