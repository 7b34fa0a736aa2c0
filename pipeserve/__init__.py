"""pipeserve's top and its shared kit.

* The command line, ``pipeserve.cli`` (``python -m pipeserve``): plan, run, local, the
  coordinator and worker servers, admin and client commands; ``pipeserve.gateway``: the
  OpenAI-compatible HTTP gateway.  These sit on top: nothing below imports them.
* The kit the coordinator, the stage workers, the gateway and the command line share:
  ``rpc`` (re-exports ``transport``, ``tls``, ``auth``, ``health``, ``status``, ``codec``),
  ``observe`` (logs with request ids, metrics), ``plan_table`` (a plan for people),
  ``launch`` (starting pipeserve processes on this machine), ``reference`` (single-process
  ``transformers`` greedy generation, what pipelined output must equal), ``env`` (the
  environment variables the edges read), and the generated ``pipeserve.v1`` /
  ``pipeserve.inference`` protobuf code.
"""
