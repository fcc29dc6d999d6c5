"""Real brokers on this machine, without containers: Debian ``redis-server`` and Apache Kafka.

Used by ``make up`` / ``make down`` (``python -m qlm.localstack``) and by the test
fixtures. This package does process management and I/O; nothing in ``qlm.core``
depends on it.
"""

from qlm.localstack.kafka import KafkaCluster, KafkaServer, fetch_kafka_jars, kafka_libs_dir
from qlm.localstack.process import free_loopback_port
from qlm.localstack.redis import LocalRedisCluster, RedisServer
from qlm.localstack.stack import LocalStack, StackPorts

__all__ = [
    "KafkaCluster",
    "KafkaServer",
    "LocalRedisCluster",
    "LocalStack",
    "RedisServer",
    "StackPorts",
    "fetch_kafka_jars",
    "free_loopback_port",
    "kafka_libs_dir",
]
