"""The estimator service: the RWT estimator behind gRPC, corrected online from telemetry."""
