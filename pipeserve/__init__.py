"""The ``pipeserve`` command line: dispatches to pipeline_core, coordinator and stage_worker."""
