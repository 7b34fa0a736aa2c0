"""Placeholder package: see the gRPC control-plane issue."""
