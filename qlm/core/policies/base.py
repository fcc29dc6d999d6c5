"""The one interface every scheduling policy implements, and the registry by name.

Contract (checked for every policy by ``tests/unit/test_policy_contract.py``):

* ``decide(snapshot, ctx)`` is pure: same inputs → same ``Decision``; it never
  mutates its inputs (they are frozen) and never reads a clock (``snapshot.now``).
* Every queued group appears in at most one worker's ``Place.order``; a group is
  placed only on a worker that has a profile for its model.
* ``Pull`` names only queued requests, each once, never more than the worker's
  free batch slots and KV capacity allow (backpressure).
* ``Evict`` names only requests running on that worker; ``Swap`` only models the
  cluster has a profile for on that worker's GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.types import Decision, QueueSnapshot


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may consult besides the snapshot: profiles and tuning knobs."""

    profiles: ProfileBook
    options: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    name: ClassVar[str]

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision: ...


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def wrap(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def policy_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def make_policy(name: str, **options: Any) -> Policy:
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise InvalidInput("policy", f"unknown policy {name!r}; expected one of "
                           f"{', '.join(sorted(_REGISTRY))}") from None
    try:
        return factory(**options)
    except TypeError as exc:  # an option the policy's constructor does not take
        if "unexpected keyword argument" not in str(exc):
            raise
        unknown = str(exc).rsplit("argument", 1)[-1].strip()
        raise InvalidInput("policy-options", f"policy {name!r} has no option {unknown}") from None


def _load_builtins() -> None:
    # Importing the modules registers them; kept lazy so base has no import cycle.
    import qlm.core.policies as pkg

    pkg.load_builtin_policies()


def options_from_json(text: str, field_name: str = "policy-options") -> dict[str, Any]:
    """Policy options given as a JSON object on a command line (``field_name`` names the
    flag in the error). Which options a policy knows, its constructor checks."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(field_name, f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InvalidInput(field_name, "must be a JSON object")
    return options
