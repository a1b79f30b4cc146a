"""What the owner and its workers say on the control line: one frozen dataclass per message, both directions.

Worker → owner (``ToOwner``): ``Hello`` once connected, ``Acquire`` a lease on a model (with the request's
priority and affinity), ``Wait`` in its queue, ``Failover`` away from a refused replica, ``Release`` with the
request's outcome, ``Cancel`` a wait or a grant it no longer wants, ``MetricsText`` answering a scrape,
``Drained`` once its requests are over, ``Pong`` answering a ``Ping``. Owner → worker (``ToWorker``):
``ConfigUpdate``, ``Granted``, ``Queued``, ``Denied``, ``Scrape``, ``Drain``, ``Hurry``, ``Stop``, ``Ping``.

On the wire a message is a tuple (its kind's code, then its fields in order): a dataclass pickled as
itself costs five times as much, and the line carries several messages per request.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from engines.scheduling.tickets import Refusal
from gateway.config.loader import Config

# -- worker → owner ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    worker: int
    pid: int


@dataclass(frozen=True, slots=True)
class Acquire:
    """A lease on ``model``, with the request's claim (engines/scheduling/contract.py ``Claim``) as its two
    fields: plain ints travel as cheaply as the tuple's other fields, a pickled ``Claim`` would not."""

    lid: int
    model: str
    priority: int = 0
    affinity: int | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    lid: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Failover:
    lid: int  # the lease whose replica refused the connection
    new_lid: int  # the id the answer comes under


@dataclass(frozen=True, slots=True)
class Release:
    lid: int
    ok: bool | None  # the request's outcome (passive health); None: nothing to say (cancelled, never sent)


@dataclass(frozen=True, slots=True)
class Cancel:
    lid: int


@dataclass(frozen=True, slots=True)
class MetricsText:
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Drained:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


ToOwner = Hello | Acquire | Wait | Failover | Release | Cancel | MetricsText | Drained | Pong

# -- owner → worker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    config: Config


@dataclass(frozen=True, slots=True)
class Granted:
    lid: int
    replica: int
    base_url: str


@dataclass(frozen=True, slots=True)
class Queued:
    lid: int


@dataclass(frozen=True, slots=True)
class Denied:
    lid: int
    reason: Refusal


@dataclass(frozen=True, slots=True)
class Scrape:
    seq: int


@dataclass(frozen=True, slots=True)
class Drain:
    grace: float


@dataclass(frozen=True, slots=True)
class Hurry:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


ToWorker = ConfigUpdate | Granted | Queued | Denied | Scrape | Drain | Hurry | Stop | Ping
Answer = Granted | Queued | Denied  # what a lease request gets back, matched to it by ``lid``
Message = ToOwner | ToWorker

# -- the wire form ----------------------------------------------------------------------------------

_KINDS: tuple[type[Any], ...] = (
    Hello,
    Acquire,
    Wait,
    Failover,
    Release,
    Cancel,
    MetricsText,
    Drained,
    Pong,
    ConfigUpdate,
    Granted,
    Queued,
    Denied,
    Scrape,
    Drain,
    Hurry,
    Stop,
    Ping,
)
_CODE = {kind: code for code, kind in enumerate(_KINDS)}


def _getter(kind: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    names = [f.name for f in fields(kind)]
    if not names:
        return lambda _: ()
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda message: (one(message),)
    return operator.attrgetter(*names)


_FIELDS = {kind: _getter(kind) for kind in _KINDS}


def to_wire(message: Message) -> tuple[Any, ...]:
    kind = type(message)
    return (_CODE[kind], *_FIELDS[kind](message))


def from_wire(data: tuple[Any, ...]) -> Message:
    """The message a wire tuple stands for; raises ValueError for one this program does not know."""
    code = data[0] if data else None
    if not isinstance(code, int) or not 0 <= code < len(_KINDS):
        raise ValueError(f"not a control-line message: {code!r}")
    kind = _KINDS[code]
    message: Message = kind(*data[1:])
    return message
