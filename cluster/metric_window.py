"""``MetricSnapshot``: the counters and histograms of one /metrics body, and their change over a window.

Lifecycle: the autoscaler's ``SignalCollector`` parses every scrape once (``parse_snapshot``, only
the families it needs) and keeps the snapshot instead of the text; at decision time it takes
``window_delta(newest, oldest)`` per process, adds the deltas of a pool's processes (``merge``) and
reads ``quantile`` (PromQL's ``histogram_quantile``) and ``rate`` from the result. Everything here is
a pure function of immutable values.

Series are summed over their label sets: a value is keyed by its sample name (``x_total``,
``x_count``, ``x_sum``, a gauge's name), a histogram's cumulative buckets by its family name and
``le``. Counter resets follow Prometheus' ``rate``: a value (or bucket) that went down means the
process restarted, and the new value is the whole delta. A restart that already counted past the old
value is caught through the ``_created`` timestamps prometheus_client exports: the earliest one of a
family moving forward means every series of it started again.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

Buckets = tuple[tuple[float, float], ...]  # ((le, cumulative count), ...) ascending, +Inf last

_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_gcount", "_gsum")
_CREATED = "_created"


class MetricsParseError(ValueError):
    """A /metrics body that is not Prometheus text exposition; ``source`` names whose it was."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(f"{source}: not Prometheus text exposition ({why})")
        self.source = source


@dataclass(frozen=True)
class MetricSnapshot:
    values: Mapping[str, float]  # sample name -> sum over label sets
    buckets: Mapping[str, Buckets]  # histogram family -> cumulative buckets summed by le
    created: Mapping[str, float]  # family -> earliest _created timestamp over its label sets

    @classmethod
    def empty(cls) -> MetricSnapshot:
        return cls({}, {}, {})


def parse_snapshot(text: str, families: Collection[str] | None = None, source: str = "metrics") -> MetricSnapshot:
    """Parse a /metrics body (Prometheus text, or OpenMetrics when it ends with ``# EOF``).

    ``families``: the family names to keep (a counter's name without ``_total``); None keeps all.
    Samples whose value is NaN are skipped. Raises ``MetricsParseError`` naming ``source``.
    """
    values: dict[str, float] = {}
    by_le: dict[str, dict[float, float]] = {}
    created: dict[str, float] = {}
    parser = parse_openmetrics if text.rstrip().endswith("# EOF") else parse_text
    try:
        for family in parser(text):
            base = family.name.removesuffix(_CREATED) if family.name.endswith(_CREATED) else family.name
            if families is not None and base not in families and family.name not in families:
                continue
            for sample in family.samples:
                value = float(sample.value)
                if math.isnan(value):
                    continue
                if sample.name.endswith(_CREATED):
                    key = sample.name.removesuffix(_CREATED)
                    created[key] = min(created.get(key, value), value)
                elif sample.name.endswith("_bucket") and "le" in sample.labels:
                    series = by_le.setdefault(sample.name.removesuffix("_bucket"), {})
                    le = _bound(sample.labels["le"], source, sample.name)
                    series[le] = series.get(le, 0.0) + value
                else:
                    values[sample.name] = values.get(sample.name, 0.0) + value
    except MetricsParseError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise MetricsParseError(source, str(e)) from e
    buckets = {name: tuple(sorted(les.items())) for name, les in by_le.items() if math.inf in les}
    return MetricSnapshot(values, buckets, created)


def window_delta(new: MetricSnapshot, old: MetricSnapshot) -> MetricSnapshot:
    """What one process counted between ``old`` and ``new`` (resets counted from zero)."""
    restarted = {f for f, t in new.created.items() if f in old.created and t > old.created[f]}
    values: dict[str, float] = {}
    for name, value in new.values.items():
        before = old.values.get(name, 0.0)
        values[name] = value if value < before or _family(name) in restarted else value - before
    buckets: dict[str, Buckets] = {}
    for name, now in new.buckets.items():
        then = old.buckets.get(name, ())
        if name in restarted or not then:
            buckets[name] = now
        elif [le for le, _ in now] != [le for le, _ in then] or any(a < b for (_, a), (_, b) in zip(now, then, strict=True)):  # fmt: skip
            buckets[name] = now  # went down, or the layout changed: a new process
        else:
            buckets[name] = tuple((le, a - b) for (le, a), (_, b) in zip(now, then, strict=True))
    return MetricSnapshot(values, buckets, dict(new.created))


def merge(snapshots: Iterable[MetricSnapshot]) -> MetricSnapshot:
    """The sum of several processes' snapshots (or deltas), as ``sum by (le)`` would give."""
    values: dict[str, float] = {}
    parts: dict[str, list[Buckets]] = {}
    created: dict[str, float] = {}
    for s in snapshots:
        for name, value in s.values.items():
            values[name] = values.get(name, 0.0) + value
        for name, b in s.buckets.items():
            parts.setdefault(name, []).append(b)
        for name, t in s.created.items():
            created[name] = min(created.get(name, t), t)
    return MetricSnapshot(values, {name: _sum_buckets(bs) for name, bs in parts.items()}, created)


def observations(d: MetricSnapshot, name: str) -> float:
    """Observations of histogram ``name`` in ``d`` (its +Inf bucket; 0 when absent)."""
    b = d.buckets.get(name)
    return b[-1][1] if b else 0.0


def quantile(d: MetricSnapshot, name: str, q: float) -> float | None:
    """PromQL ``histogram_quantile(q, ...)`` over histogram ``name``: linear within the bucket that
    holds rank ``q * count``, from 0 below the first bound; the +Inf bucket answers with the last finite
    bound. None when the histogram has no observations."""
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
    b = d.buckets.get(name)
    if not b or b[-1][1] <= 0:
        return None
    counts, running = [], 0.0
    for _, c in b:  # non-monotonic counts (scrape races) are raised to the running max, as Prometheus does
        running = max(running, c)
        counts.append(running)
    rank = q * counts[-1]
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if i == len(b) - 1:
        return b[-2][0] if len(b) > 1 else None  # only a +Inf bucket: no finite bound to report
    upper = b[i][0]
    if i == 0 and upper <= 0:
        return upper
    lower, below = (0.0, 0.0) if i == 0 else (b[i - 1][0], counts[i - 1])
    inside = counts[i] - below
    if inside <= 0:
        return lower
    return lower + (upper - lower) * (rank - below) / inside


def rate(d: MetricSnapshot, name: str, seconds: float) -> float | None:
    """Per-second rate of value ``name`` over a delta spanning ``seconds``; None without a span or series."""
    if seconds <= 0 or name not in d.values:
        return None
    return d.values[name] / seconds


def _bound(le: str, source: str, series: str) -> float:
    try:
        value = float(le)
    except ValueError as e:
        raise MetricsParseError(source, f"{series}: le={le!r} is not a number") from e
    if math.isnan(value):
        raise MetricsParseError(source, f"{series}: le is NaN")
    return value


def _family(sample_name: str) -> str:
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name.removesuffix(suffix)
    return sample_name


def _sum_buckets(parts: list[Buckets]) -> Buckets:
    """Add cumulative buckets; a bound one part lacks takes that part's count at its next lower bound."""
    if len(parts) == 1:
        return parts[0]
    bounds = sorted({le for b in parts for le, _ in b})
    return tuple((le, sum(_at(b, le) for b in parts)) for le in bounds)


def _at(b: Buckets, le: float) -> float:
    below = 0.0
    for bound, count in b:
        if bound > le:
            break
        below = count
    return below
