"""Generated gRPC code (see protos/)."""
