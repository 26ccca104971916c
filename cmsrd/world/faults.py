"""Deterministic fault injection for the loopback servers.

Network clients (tile fetcher, STAC search, COG reads, PBF download) must survive what real services
do to them: slow answers, 429 with Retry-After, 5xx, hung connections, damaged or cut-off bodies.
`FaultConfig` says how often each happens; `FaultPlan` turns the n-th faultable request into a
`FaultDecision` using only (seed, n), so the same request sequence always meets the same faults and a
failing test can be replayed.

Kinds of fault (at most one per request, besides latency which applies to every matched request):

- ``error``:    an HTTP error status drawn from `error_codes`; 429 and 503 carry ``Retry-After``.
- ``timeout``:  the server holds the connection without answering for `timeout_s`, then drops it, so a
                client with a shorter read timeout sees its timeout fire.
- ``corrupt``:  the body's bytes are altered (length kept, Content-Length correct): the first byte is
                always changed, so format magic checks (JPEG SOI, '{' of JSON, TIFF header) fail, and
                about one byte in 512 more is flipped, so checksums differ.
- ``truncate``: Content-Length announces the full body but only half of it is sent before the
                connection is closed; the client sees an incomplete read.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, unknown_name

FAULT_KINDS = ("error", "timeout", "corrupt", "truncate")


@dataclass(frozen=True)
class FaultConfig:
    """How often the server misbehaves. Rates are per request in [0, 1]; their sum must be <= 1.

    `paths` limits faults (latency included) to URL paths starting with one of the given prefixes,
    e.g. ``("/arcgis/",)`` to fault only the tile endpoint; None faults every route.
    """

    latency_s: float = 0.0
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (429, 500, 503)
    retry_after_s: int = 1
    timeout_rate: float = 0.0
    timeout_s: float = 30.0
    corrupt_rate: float = 0.0
    truncate_rate: float = 0.0
    seed: int = 0
    paths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists from YAML/CLI but store tuples so the config stays hashable and immutable.
        object.__setattr__(self, "error_codes", tuple(int(c) for c in self.error_codes))
        if self.paths is not None:
            paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
            object.__setattr__(self, "paths", paths)
        for name in ("error_rate", "timeout_rate", "corrupt_rate", "truncate_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise InputError(f"fault {name}", f"{rate} is not a rate in [0, 1]", "use a value between 0 and 1")
        total = self.error_rate + self.timeout_rate + self.corrupt_rate + self.truncate_rate
        if total > 1.0 + 1e-9:
            raise InputError(
                "fault rates",
                f"error+timeout+corrupt+truncate rates sum to {total:.3f} > 1",
                "lower the rates so that at most one fault per request is needed",
            )
        if self.latency_s < 0 or self.timeout_s < 0 or self.retry_after_s < 0:
            raise InputError("fault durations", "latency_s, timeout_s and retry_after_s must be >= 0")
        if self.error_rate > 0 and not self.error_codes:
            raise InputError("fault error_codes", "empty while error_rate > 0", "give e.g. (429, 500, 503)")
        bad = [c for c in self.error_codes if not 400 <= c <= 599]
        if bad:
            raise InputError("fault error_codes", f"{bad} are not HTTP error statuses", "use 4xx/5xx codes")
        if self.paths is not None and not all(isinstance(p, str) and p.startswith("/") for p in self.paths):
            raise InputError("fault paths", f"{self.paths!r} must be URL path prefixes", "start each with '/'")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "world.faults") -> FaultConfig:
        """A FaultConfig from a preset's `world.faults` mapping; wrong keys and types are InputErrors."""
        if not isinstance(values, Mapping):
            raise InputError(where, f"must be a mapping of fault settings, got {type(values).__name__}")
        try:
            return cls(**dict(values))
        except InputError as e:
            raise InputError(f"{where}: {e.what}", e.problem, e.fix) from None
        except (TypeError, ValueError) as e:
            raise InputError(
                where, f"has a value of the wrong type ({e})", "see cmsrd.world.faults.FaultConfig"
            ) from None

    def applies_to(self, path: str) -> bool:
        """Whether requests to `path` are subject to faults."""
        return self.paths is None or any(path.startswith(p) for p in self.paths)

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or (self.error_rate + self.timeout_rate + self.corrupt_rate + self.truncate_rate) > 0


def _check_keywords(init):
    """Unknown keywords (a typo such as `eror_rate`) are one InputError naming the closest field, not a
    TypeError from the generated __init__."""
    names = [f.name for f in dataclasses.fields(FaultConfig)]

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                raise unknown_name(f"fault setting {key!r}", "unknown", key, names)
        init(self, *args, **kwargs)

    return checked


FaultConfig.__init__ = _check_keywords(FaultConfig.__init__)  # type: ignore[method-assign]


@dataclass(frozen=True)
class FaultDecision:
    """What happens to one request: `kind` is None (answer normally) or one of FAULT_KINDS."""

    index: int
    kind: str | None = None
    status: int | None = None  # for kind == "error"
    latency_s: float = 0.0
    corrupt_seed: int = 0  # drives which bytes a "corrupt" fault alters

    def corrupt_positions(self, length: int) -> frozenset[int]:
        """Byte offsets a corrupt fault alters in a body of `length` bytes (always includes 0)."""
        if length <= 0:
            return frozenset()
        rng = random.Random(self.corrupt_seed)
        extra = max(1, length // 512)
        return frozenset({0, *(rng.randrange(length) for _ in range(min(extra, length)))})


class FaultPlan:
    """Assigns decisions to faultable requests in arrival order; thread-safe.

    The n-th decision depends only on (config.seed, n), see `decide_index`, so two servers with the same
    config given the same request sequence inject the same faults.
    """

    def __init__(self, config: FaultConfig | None):
        self.config = config
        self._next = 0
        self._lock = threading.Lock()

    def decide(self, path: str) -> FaultDecision | None:
        """The decision for the next request to `path`; None when faults do not apply to it."""
        cfg = self.config
        if cfg is None or not cfg.active or not cfg.applies_to(path):
            return None
        with self._lock:
            n = self._next
            self._next += 1
        return decide_index(cfg, n)

    @property
    def decided(self) -> int:
        """How many faultable requests have been seen under the current config."""
        with self._lock:
            return self._next


def decide_index(config: FaultConfig, n: int) -> FaultDecision:
    """The decision for the n-th faultable request: a pure function of (config, n)."""
    rng = random.Random(f"cmsrd.faults:{config.seed}:{n}")
    u = rng.random()
    code_pick = rng.random()
    corrupt_seed = rng.getrandbits(32)
    kind: str | None = None
    status = None
    edge = 0.0
    for name, rate in (
        ("error", config.error_rate),
        ("timeout", config.timeout_rate),
        ("corrupt", config.corrupt_rate),
        ("truncate", config.truncate_rate),
    ):
        edge += rate
        if rate > 0 and u < edge:
            kind = name
            break
    if kind == "error":
        status = config.error_codes[int(code_pick * len(config.error_codes)) % len(config.error_codes)]
    return FaultDecision(index=n, kind=kind, status=status, latency_s=config.latency_s, corrupt_seed=corrupt_seed)


def schedule(config: FaultConfig, count: int) -> list[str | None]:
    """The fault kinds (``"error:503"`` for errors) the first `count` faultable requests will meet."""
    out: list[str | None] = []
    for n in range(count):
        d = decide_index(config, n)
        out.append(f"error:{d.status}" if d.kind == "error" else d.kind)
    return out


@dataclass
class BodyFaulter:
    """Applies a corrupt/truncate decision to a body streamed in chunks.

    `limit` is how many bytes may be sent (None: all); `positions` the offsets to alter.
    """

    length: int
    positions: frozenset[int] = field(default_factory=frozenset)
    limit: int | None = None

    @classmethod
    def for_decision(cls, decision: FaultDecision | None, length: int) -> BodyFaulter:
        if decision is None or length <= 0:
            return cls(length)
        if decision.kind == "corrupt":
            return cls(length, positions=decision.corrupt_positions(length))
        if decision.kind == "truncate":
            return cls(length, limit=length // 2)
        return cls(length)

    @property
    def truncates(self) -> bool:
        return self.limit is not None

    def apply(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield the (altered, possibly cut) chunks to put on the wire."""
        offset = 0
        for chunk in chunks:
            if self.limit is not None:
                if offset >= self.limit:
                    return
                chunk = chunk[: self.limit - offset]
            if self.positions:
                hits = [p - offset for p in self.positions if offset <= p < offset + len(chunk)]
                if hits:
                    buf = bytearray(chunk)
                    for i in hits:
                        buf[i] ^= 0xA5  # non-zero mask: the byte always changes
                    chunk = bytes(buf)
            offset += len(chunk)
            yield chunk
