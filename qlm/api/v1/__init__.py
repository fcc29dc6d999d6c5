"""Generated gRPC and protobuf code of proto/qlm/v1 (make proto)."""
