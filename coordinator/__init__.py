"""The coordinator: it registers stage workers, plans models on the meta device, places one
stage per worker, keeps generation models up through lost and leaving workers, and relays
client calls (``pipeserve.v1`` and KServe) to the stage-0 worker.  It never holds weights or
activations.

Layers, each importing only those above it:

* domain, no gRPC -- ``errors``, ``records`` (workers and models, enum states),
  ``client`` (the worker interface), ``store`` (SQLite), ``placement`` (planning),
  ``rendezvous``, ``recovery`` + ``leaving`` + ``core`` (the :class:`Coordinator`), ``relay``;
* edge -- ``grpc_client`` (the worker interface over gRPC), ``codec`` (proto <-> domain),
  ``edge`` (tokens, errors to status codes), the servicers ``registry``, ``kserve`` and
  ``server`` (``create_server(config)`` and ``serve``), ``config``.
"""
