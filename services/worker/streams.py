"""Token stream writes of one worker, batched: one Redis round trip for many requests.

Every running request's serve task calls :meth:`StreamWriter.append` with the tokens
it has. Appends that arrive while a batch is being written wait for the next one, so
under load each round trip carries the chunks of every request that produced output
since the last one (:meth:`qlm.store.store.RedisQueueStore.append_tokens_many`), and
at light load a single append goes out at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from qlm.core.errors import QlmError
from qlm.store.store import RedisQueueStore, TokenAppend

_Pending = tuple[TokenAppend, "asyncio.Future[int]"]


class StreamWriter:
    """Batches ``append_tokens`` of one worker (see the module docstring)."""

    def __init__(self, store: RedisQueueStore, worker_id: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self._pending: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        self.num_round_trips = 0
        self.num_appends = 0

    async def append(self, request_id: str, token_ids: tuple[int, ...], text: str = "") -> int:
        """Append to ``request_id``'s stream; returns its new ``num_generated``. Raises
        what :meth:`~qlm.store.store.RedisQueueStore.append_tokens` raises."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((TokenAppend(request_id, token_ids, text), future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name=f"streams-{self.worker_id}")
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other requests of this engine step add theirs
        while self._pending:
            batch, self._pending = self._pending, []
            self.num_round_trips += 1
            self.num_appends += len(batch)
            try:
                results = await self.store.append_tokens_many(
                    self.worker_id, [append for append, _ in batch]
                )
            except Exception as error:  # Redis down: every caller gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, QlmError):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
