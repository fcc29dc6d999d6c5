"""qlm: an SLO-oriented queue manager for LLM serving.

The pure scheduling core lives in :mod:`qlm.core` (no I/O, clock injected);
Redis, Kafka and gRPC adapters live beside it and the services in ``services/``.
"""

__version__ = "0.1.0"
