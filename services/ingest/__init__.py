"""ingest: the gRPC front door of qlm and the Kafka batch consumer (python -m services.ingest)."""
