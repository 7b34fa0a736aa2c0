"""The stage worker: one process per stage, on its own host.

* ``server``: the ``StageWorker`` gRPC servicer (thin: each call over the assigned job, errors
  through ``rpc.abort_for``) and ``serve()``, which builds the server, registers and heartbeats;
* ``job``: one stage assignment -- load the stage's shard, join the data plane (gloo/NCCL ring
  for generation, mesh for forward passes) and run; stage 0 also runs the scheduler;
* ``lifecycle``: register, heartbeat, and leave on SIGTERM (the stage moves to a spare);
* ``rendezvous``: the ``torch.distributed`` store the coordinator hosts over gRPC.

It depends on ``pipeline_core`` and the shared kit in ``pipeserve`` (``rpc``, ``observe``,
the generated ``pipeserve.v1``), never on the command line; settings come in as arguments.
"""
