"""Where ingest's predicted wait comes from: the estimator service, or the estimator in process.

* :class:`RemotePredictor` (``--estimator-addr``): one ``Estimator.PredictWait`` call per
  new submission, with a deadline of ``timeout_s``. When the estimator does not answer in
  time the request is admitted with no prediction (fail open: admission control must not
  turn an estimator outage into an ingest outage; ``Prediction.known`` is False and the
  ``admitted`` event carries no predicted wait); the failure is logged.
* :class:`LocalPredictor` (no address, ``--workers-file`` given): the same plane the
  estimator service runs (:class:`qlm.estimator_plane.EstimatorPlane`) in this
  process, over this ingest's store and the declared workers (no telemetry, so no online
  correction).
* neither: :class:`services.ingest.plane.NoQueueModel` (wait 0, always admitted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from qlm.api.v1 import estimator_pb2 as epb
from qlm.api.v1 import estimator_pb2_grpc
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.core.types import Request
from qlm.estimator_plane import EstimatorPlane, WaitAnswer, WaitQuery
from qlm.log import get_logger
from qlm.roster import WorkerRoster, read_workers_file
from qlm.store.store import RedisQueueStore
from services.common.messages import SLO_CLASS_TO_PB
from services.common.settings import CommonSettings
from services.common.tls import channel
from services.ingest.plane import NoQueueModel, Prediction, WaitPredictor
from services.ingest.settings import IngestSettings

log = get_logger("services.ingest.predictors")


def prediction_of(answer: WaitAnswer | epb.PredictWaitResponse) -> Prediction:
    return Prediction(answer.wait_mean_s, answer.wait_std_s, answer.p_meet_slo, answer.admit,
                      answer.retry_after_s)


class RemotePredictor:
    """PredictWait over gRPC (module docstring). ``await close()`` when done."""

    def __init__(self, address: str, timeout_s: float = 0.25,
                 settings: CommonSettings | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = (channel(address, settings) if settings is not None
                         else grpc.aio.insecure_channel(address))
        self._stub = estimator_pb2_grpc.EstimatorStub(self._channel)

    async def predict(self, request: Request, now: float) -> Prediction:
        query = epb.PredictWaitRequest(
            model=request.model, slo_class=SLO_CLASS_TO_PB[request.slo_class],
            ttft_slo_s=request.slo.ttft_s, prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens)
        try:
            answer = await self._stub.PredictWait(query, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            log.warning("estimator_unavailable", request_id=request.id, address=self.address,
                        code=error.code().name, details=error.details())
            return Prediction(known=False)
        return prediction_of(answer)

    async def close(self) -> None:
        await self._channel.close()


class LocalPredictor:
    """The estimator plane in process (module docstring)."""

    def __init__(self, plane: EstimatorPlane) -> None:
        self.plane = plane

    async def predict(self, request: Request, now: float) -> Prediction:
        query = WaitQuery(request.model, request.slo_class, request.prompt_tokens,
                          request.max_tokens, request.slo.ttft_s)
        return prediction_of(await self.plane.predict_wait(query))

    async def close(self) -> None:
        return None


def make_predictor(settings: IngestSettings, store: RedisQueueStore,
                   clock: Callable[[], float] = time.time) -> WaitPredictor:
    """The predictor the settings ask for (module docstring)."""
    if settings.estimator_addr:
        return RemotePredictor(settings.estimator_addr, settings.estimator_timeout_s, settings)
    if settings.workers_file is not None:
        profiles = ProfileBook.load(settings.profiles_dir or PROFILE_DIR)
        roster = WorkerRoster(read_workers_file(settings.workers_file), timeout_s=0)
        plane = EstimatorPlane(RWTEstimator(profiles), roster, store,
                               admission_min_p=settings.admission_min_p, clock=clock)
        return LocalPredictor(plane)
    return NoQueueModel()


async def close_predictor(predictor: Any) -> None:
    close = getattr(predictor, "close", None)
    if close is not None:
        await close()
