"""Wire APIs of qlm (generated protobuf/gRPC code per version)."""
