"""The Kafka bus: topic names and layout, record schemas, producer, and the consumer
that commits only after a record's effect is durable (malformed records go to the DLQ).

Schemas are documented in docs/kafka.md.
"""

from qlm.bus.consumer import BusConsumer, ConsumerOptions, is_outage
from qlm.bus.producer import BusProducer
from qlm.bus.records import (
    BatchResult,
    BusRecord,
    DeadLetter,
    Event,
    LsoCommand,
    Telemetry,
    decode_batch_request,
    encode_batch_request,
)
from qlm.bus.topics import TopicLayout, TopicNames, TopicSpec, ensure_topics, topic_specs

__all__ = [
    "BatchResult",
    "BusConsumer",
    "BusProducer",
    "BusRecord",
    "ConsumerOptions",
    "DeadLetter",
    "Event",
    "LsoCommand",
    "Telemetry",
    "TopicLayout",
    "TopicNames",
    "TopicSpec",
    "decode_batch_request",
    "encode_batch_request",
    "ensure_topics",
    "is_outage",
    "topic_specs",
]
