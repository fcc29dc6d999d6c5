"""The one interface every scheduling policy implements, the registry by name, the one
parser of policy options, and the queue orders policies declare.

Contract (checked for every policy by ``tests/unit/test_policy_contract.py``):

* ``decide(snapshot, ctx)`` is pure: same inputs → same ``Decision``; it never
  mutates its inputs (they are frozen) and never reads a clock (``snapshot.now``).
  (qlm's fair share keeps counters of the service each tenant received, fed by the
  snapshots it decided on: a fresh instance, or the same snapshot again, decides alike.)
* Every queued group appears in at most one worker's ``Place.order``; a group is
  placed only on a worker that has a profile for its model.
* ``Pull`` names only queued requests, each once, never more than the worker's
  free batch slots and KV capacity allow (backpressure).
* ``Evict`` names only requests running on that worker; ``Swap`` only models the
  cluster has a profile for on that worker's GPU.

Every policy class declares ``options_type``, a frozen dataclass of its options (each
field typed, with a default and a one-line ``doc``, see :func:`option`), and
``queue_order``, the key over a group's :class:`GroupOrder` under which it serves
queued groups (the estimator asks it through :func:`order_key`). Options arrive as a
mapping (JSON from a command line or settings, or ``PolicyContext.options``) and
become that dataclass in :func:`parse_options` only.

A policy that keeps state across decisions which a restarted scheduler should go on from
(qlm's fair-share counters) also implements :class:`StatefulPolicy`: ``state()`` returns
it as JSON-ready data, ``restore(state)`` takes it back (InvalidInput naming the field
when it is malformed). The scheduler service saves and restores it through
:func:`policy_state` / :func:`restore_policy_state`, which do nothing for the other
policies, so it stays policy-agnostic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType, NoneType, UnionType
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.types import Decision, QueueSnapshot, RequestGroup, SLOClass


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may consult besides the snapshot: profiles and tuning knobs.

    ``options`` (a mapping as given: JSON object, settings) override the options the
    policy was made with; the policy parses them with :func:`parse_options`.
    """

    profiles: ProfileBook
    options: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ queue order
@dataclass(frozen=True, slots=True)
class GroupOrder:
    """What the policies order groups by: earliest deadline, first arrival, class level."""

    earliest_deadline_at: float
    first_arrival_at: float
    level: int

    @classmethod
    def of(cls, group: RequestGroup) -> GroupOrder:
        return cls(min(r.deadline_at for r in group.requests),
                   min(r.arrival_at for r in group.requests),
                   priority_level(group.slo_class))


def priority_level(slo_class: SLOClass) -> int:
    """0 for interactive groups, 1 for every other class."""
    return 0 if slo_class is SLOClass.INTERACTIVE else 1


#: A policy's queue order: a queued group with a smaller key is served first (ties:
#: first arrival, then group key).
QueueOrder = Callable[[GroupOrder], tuple[float, ...]]


def by_deadline(o: GroupOrder) -> tuple[float, ...]:
    """Earliest deadline first."""
    return (o.earliest_deadline_at,)


def by_arrival(o: GroupOrder) -> tuple[float, ...]:
    """First come, first served."""
    return (o.first_arrival_at,)


def by_level_then_arrival(o: GroupOrder) -> tuple[float, ...]:
    """Interactive first, then first come, first served."""
    return (o.level, o.first_arrival_at)


# ------------------------------------------------------------------ options
def option(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None) -> Any:
    """A policy option field: its default, a one-line ``doc`` and the range its value
    must lie in (checked by :func:`parse_options`). A mapping default is frozen."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, Mapping):
        frozen = MappingProxyType(dict(default))
        return field(default_factory=lambda: frozen, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class NoOptions:
    """A policy without options."""


OptionsT = TypeVar("OptionsT")


def parse_options(options_type: type[OptionsT], given: Mapping[str, Any] | OptionsT | None, *,
                  policy: str, base: OptionsT | None = None) -> OptionsT:
    """``given`` (a mapping of option name → value, or already an ``options_type``) as an
    ``options_type``; names not given keep ``base``'s values (default: the defaults).

    InvalidInput names the option and the problem: an option the policy does not have
    (field ``policy-options``), a value of the wrong type or out of range (field
    ``options.<name>``, or ``options.<name>.<key>`` inside a mapping), or what the
    options class's own ``__post_init__`` checks.
    """
    if isinstance(given, options_type):
        return given
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise InvalidInput("policy-options", "must be a JSON object")
    fields, hints = _fields_of(typing.cast(Any, options_type))
    values: dict[str, Any] = {}
    for name, value in given.items():
        spec = fields.get(name)
        if spec is None:
            known = ", ".join(sorted(fields)) or "none"
            raise InvalidInput("policy-options", f"policy {policy!r} has no option {name!r} "
                                                 f"(its options: {known})")
        values[name] = _coerce(f"options.{name}", hints[name], value, spec.metadata)
    if base is not None:
        return dataclasses.replace(base, **values)  # type: ignore[type-var]
    return options_type(**values)


def options_doc(options_type: type[Any]) -> dict[str, str]:
    """Option name → its one-line doc (for help texts and docs)."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(options_type)
            if f.init}


@cache
def _fields_of(options_type: type[Any]) -> tuple[dict[str, dataclasses.Field[Any]],
                                                 dict[str, Any]]:
    hints = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type) if f.init}
    return fields, hints


def _coerce(name: str, hint: Any, value: Any, limits: Mapping[str, Any]) -> Any:
    """``value`` as the type ``hint`` says, within ``limits``; InvalidInput naming ``name``."""
    origin = typing.get_origin(hint)
    if origin in (UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and NoneType in args:
            return None
        (inner,) = [a for a in args if a is not NoneType]
        return _coerce(name, inner, value, limits)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInput(name, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(name, f"must be an integer, got {value!r}")
        return _in_range(name, value, limits)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidInput(name, f"must be finite, got {value}")
        return _in_range(name, float(value), limits)
    if origin is not None and issubclass(origin, Mapping):
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise InvalidInput(name, f"must be an object, got {value!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, key_type):
                raise InvalidInput(name, f"keys must be strings, got {k!r}")
            out[k] = _coerce(f"{name}.{k}", value_type, v, limits)
        return MappingProxyType(out)
    return value  # Any, or a type the options class checks itself


def _in_range(name: str, value: float, limits: Mapping[str, Any]) -> Any:
    ge, gt, le = limits.get("ge"), limits.get("gt"), limits.get("le")
    if ge is not None and value < ge:
        raise InvalidInput(name, f"must be >= {ge}, got {value}")
    if gt is not None and value <= gt:
        raise InvalidInput(name, f"must be > {gt}, got {value}")
    if le is not None and value > le:
        raise InvalidInput(name, f"must be <= {le}, got {value}")
    return value


class ContextOptions:
    """A policy's options with ``PolicyContext.options`` applied over them, parsed once
    per context mapping (contexts live for many decisions)."""

    __slots__ = ("_base", "_given", "_parsed", "_policy", "_type")

    def __init__(self, options_type: type[Any], base: Any, policy: str) -> None:
        self._type, self._base, self._policy = options_type, base, policy
        self._given: Mapping[str, Any] | None = None
        self._parsed = base

    def of(self, ctx: PolicyContext) -> Any:
        given = ctx.options
        if not given:
            return self._base
        if given is not self._given:
            self._parsed = parse_options(self._type, given, policy=self._policy, base=self._base)
            self._given = given
        return self._parsed


# ------------------------------------------------------------------ registry
class Policy(Protocol):
    name: ClassVar[str]
    #: The frozen dataclass of this policy's options.
    options_type: ClassVar[type[Any]]
    #: The order in which this policy serves queued groups (see :func:`order_key`).
    queue_order: ClassVar[QueueOrder]

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision: ...


@runtime_checkable
class StatefulPolicy(Protocol):
    """A policy with state worth keeping across a scheduler restart (module docstring)."""

    def state(self) -> dict[str, Any]:
        """The state as JSON-ready data (a dict of str keys, lists, numbers, strings)."""
        ...

    def restore(self, state: Any) -> None:
        """Go on from ``state`` (what :meth:`state` returned, maybe in another process),
        replacing the state held; InvalidInput naming the field when it is malformed, and
        then the state held is unchanged."""
        ...


@runtime_checkable
class FinishObserver(Protocol):
    """A policy that learns from each finished request (fair share charges it what no
    snapshot saw); the scheduler and the simulator call it once per finished request,
    never while the policy decides."""

    def on_finished(self, request_id: str, slo_class: SLOClass, tenant: str,
                    num_prompt_tokens: int, num_output_tokens: int) -> None: ...


def policy_state(policy: Any) -> dict[str, Any] | None:
    """``policy``'s state to keep (:class:`StatefulPolicy`), or None: it keeps none."""
    return policy.state() if isinstance(policy, StatefulPolicy) else None


def restore_policy_state(policy: Any, state: Any) -> bool:
    """Give ``policy`` its saved ``state``; False when it keeps none (nothing done)."""
    if not isinstance(policy, StatefulPolicy):
        return False
    policy.restore(state)
    return True


PolicyClass = type[Policy]
_REGISTRY: dict[str, Any] = {}

P = TypeVar("P")


def register(name: str) -> Callable[[P], P]:
    def wrap(cls: P) -> P:
        _REGISTRY[name] = cls
        return cls

    return wrap


def policy_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def policy_class(name: str) -> PolicyClass:
    """The class registered as ``name``; InvalidInput naming the known ones otherwise."""
    _load_builtins()
    try:
        cls: PolicyClass = _REGISTRY[name]
    except KeyError:
        raise InvalidInput("policy", f"unknown policy {name!r}; expected one of "
                           f"{', '.join(sorted(_REGISTRY))}") from None
    return cls


def make_policy(name: str, **options: Any) -> Policy:
    """Policy ``name`` made with ``options`` (parsed by :func:`parse_options`)."""
    cls = policy_class(name)
    parsed = parse_options(cls.options_type, options, policy=name)
    return cls(options=parsed)  # type: ignore[call-arg]


def check_policy_options(name: str, options: Mapping[str, Any]) -> None:
    """InvalidInput unless ``options`` are valid options of policy ``name`` (for settings
    and command lines, before anything starts)."""
    parse_options(policy_class(name).options_type, options, policy=name)


def order_key(name: str) -> QueueOrder:
    """Policy ``name``'s queue order, as the policy declares it."""
    return policy_class(name).queue_order


def _load_builtins() -> None:
    # Importing the modules registers them; kept lazy so base has no import cycle.
    import qlm.core.policies as pkg

    pkg.load_builtin_policies()


def options_from_json(text: str, field_name: str = "policy-options") -> dict[str, Any]:
    """Policy options given as a JSON object on a command line (``field_name`` names the
    flag in the error); :func:`parse_options` checks them against a policy."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(field_name, f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InvalidInput(field_name, "must be a JSON object")
    return options
