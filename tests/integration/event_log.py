"""Every record of a test's ``qlm.events`` topic, for the stack tests to assert on."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer


class EventLog:
    """Every record of ``qlm.events`` (read from the start of the test's own topic)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="earliest")
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for record in self.consumer:
            self.events.append(json.loads(record.value))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def count(self, kind: str) -> Counter[str]:
        """How many events of ``kind`` each request has."""
        return Counter(e["request_id"] for e in self.of_type(kind))

    def workers_of(self, kind: str, request_id: str) -> list[str]:
        return [e["worker"] for e in self.of_type(kind) if e["request_id"] == request_id]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()
