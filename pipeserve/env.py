"""Environment variables pipeserve reads -- only at its edges: the command line and the
servers' start-up, which pass the values down (the manifests are checked against this)."""

ENV_VARS = {
    "PIPESERVE_LOG": "log level of every pipeserve process (DEBUG, INFO, WARNING; default WARNING)",
    "PIPESERVE_ADMIN_TOKEN": "coordinator: require 'authorization: Bearer <token>' on Admin "
    "calls; pipeserve admin: send it",
    "PIPESERVE_CLIENT_TOKEN": "coordinator: require it as a bearer token on client calls "
    "(Inference, KServe inference); pipeserve generate: send it",
    "PIPESERVE_WORKER_TOKEN": "coordinator: workers must present it to register; worker: send it",
    "PIPESERVE_DATAPLANE_TIMEOUT": "worker: seconds before a stuck gloo/NCCL operation fails "
    "(default 60)",
    "PIPESERVE_TLS_CA": "CA certificate (verify peers; servers then require client certs)",
    "PIPESERVE_TLS_CERT": "this process's TLS certificate",
    "PIPESERVE_TLS_KEY": "its private key",
    "PIPESERVE_STEP_TIMING": "worker, run: 1 times each decode step per stage (compute, stage "
    "Python, sampling, send, receive-wait, scheduler) into the stats; default off",
    "PIPESERVE_COMPILE_DECODE": "worker, run: N compiles each stage's decode steps of N rows or "
    "more (torch.compile on a bucketed static KV cache; 1: every step); default off (eager)",
    "PIPESERVE_CUDA_IPC": "worker, run: 0 sends activations between two stages sharing one GPU "
    "through host memory instead of CUDA IPC (both ends must agree); default 1",
    "PIPESERVE_PROFILE_CACHE": "the JSON file measured unit times are kept in (planner, workers' "
    "profiling; default ~/.cache/pipeserve/unit-profiles.json)",
}
THIRD_PARTY_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "OMP_", "CUDA_")
"""Variables read by torch.distributed / NCCL / gloo / CUDA, which users set for networking."""
