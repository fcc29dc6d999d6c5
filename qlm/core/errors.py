"""The error families of qlm, named once.

Every validation error names the offending field and the problem, so that a
transport (gRPC status, Kafka dead-letter record, CLI message) can show it as is.
"""

from __future__ import annotations

from collections.abc import Mapping


class QlmError(Exception):
    """Base of every error qlm raises on purpose."""


class InvalidInput(QlmError, ValueError):
    """Input that can never succeed: maps to gRPC INVALID_ARGUMENT / a DLQ record."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str]]:
        # crosses process pools as itself, not as a TypeError about missing arguments
        return (type(self), (self.field, self.problem))


class UnknownModel(InvalidInput):
    """A request names a model the deployment does not serve (HTTP 404 ``model_not_found``;
    gRPC INVALID_ARGUMENT like any other invalid field)."""

    def __init__(self, field: str, problem: str, model: str = "") -> None:
        super().__init__(field, problem)
        self.model = model

    def __reduce__(self) -> tuple[type[UnknownModel], tuple[str, str, str]]:  # type: ignore[override]
        return (type(self), (self.field, self.problem, self.model))


class NotServed(UnknownModel):
    """A model of the catalogue that no worker serves now: gRPC FAILED_PRECONDITION (it
    may be served later), a DLQ record on Kafka; an HTTP front door answers it as it
    answers an unknown model."""


class NotFound(QlmError, KeyError):
    """A named thing (request, model, profile) does not exist: gRPC NOT_FOUND."""

    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"{what} {name!r} not found")
        self.what = what
        self.name = name

    def __reduce__(self) -> tuple[type[NotFound], tuple[str, str]]:
        return (type(self), (self.what, self.name))

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class Unavailable(QlmError):
    """A dependency (Redis, Kafka, estimator) does not answer: gRPC UNAVAILABLE."""


class Unauthenticated(QlmError):
    """The caller did not prove who it is (no API key, or an unknown or revoked one):
    gRPC UNAUTHENTICATED, HTTP 401. The message never says which tenants exist."""


class Overloaded(QlmError):
    """Admission control refused work now (gRPC RESOURCE_EXHAUSTED); it may be retried
    after ``retry_after_s``. ``details`` (string values) travel as trailing metadata."""

    def __init__(self, message: str, retry_after_s: float,
                 details: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.details = dict(details or {})

    def __reduce__(self) -> tuple[type[Overloaded], tuple[str, float, dict[str, str]]]:
        return (type(self), (str(self.args[0]), self.retry_after_s, self.details))


class QuotaExceeded(Overloaded):
    """A tenant is over one of its quotas (queued requests, tokens per minute): gRPC
    RESOURCE_EXHAUSTED, HTTP 429, with the seconds after which to retry."""
