"""Environment variables pipeserve reads (the deployment manifests are checked against this)."""

ENV_VARS = {
    "PIPESERVE_LOG": "log level of every pipeserve process (DEBUG, INFO, WARNING; default WARNING)",
    "PIPESERVE_ADMIN_TOKEN": "coordinator: require 'authorization: Bearer <token>' on Admin "
    "calls; pipeserve admin: send it",
}
THIRD_PARTY_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "OMP_", "CUDA_")
"""Variables read by torch.distributed / NCCL / gloo / CUDA, which users set for networking."""
