"""GET /metrics: Prometheus text format, read from the hub's counters at scrape time.

Nothing here runs on the hot path: the hub keeps plain integer counters (and RTT
bucket counts) and this collector turns them into metric families when
Prometheus scrapes, with the official client library's exposition format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tether.hub import Hub
from tether.message import Priority
from tether.views import RTT_BUCKETS

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HubCollector:
    """A Prometheus collector over one hub."""

    def __init__(self, hub: Hub, worker: str | None = None) -> None:
        self.hub = hub
        # Under `--workers N`, every sample carries its worker's index (workerviews.py).
        self.label = ["worker"] if worker is not None else []
        self.value = [worker] if worker is not None else []

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        s = hub.stats
        hb = hub.heartbeat
        label, value_of = self.label, self.value

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"tether_{name}", doc, labels=label)
            family.add_metric(value_of, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"tether_{name}", doc, labels=label)
            family.add_metric(value_of, value)
            return family

        yield gauge("connections", "WebSocket clients connected now", len(hub.registry))
        yield counter("connections_opened", "WebSocket clients accepted", s.connections_total)
        yield counter("connections_refused", "Upgrades refused at the limit", s.connections_refused)
        yield counter("heartbeat_pings_sent", "Protocol pings sent", hb.pings_sent if hb else 0)
        yield counter("heartbeat_pongs_received", "Pongs received", hb.pongs if hb else 0)
        yield counter("heartbeat_stale_closed", "Connections closed as stale",
                      hb.stale_closed if hb else 0)
        yield counter("heartbeat_late_checks", "Checks that ran late and counted no miss",
                      hb.late_checks if hb else 0)
        buckets = [(str(le), c) for le, c in zip(
            RTT_BUCKETS, accumulate(s.rtt_counts), strict=False)]
        buckets.append(("+Inf", sum(s.rtt_counts)))
        rtt = HistogramMetricFamily("tether_rtt_seconds", "Ping round-trip time", labels=label)
        rtt.add_metric(value_of, buckets, s.rtt_sum)
        yield rtt
        yield gauge("loop_lag_seconds", "Event-loop lag, last measurement", s.loop_lag)
        yield gauge("loop_lag_max_seconds", "Largest event-loop lag seen", s.loop_lag_max)
        yield counter("loop_stalls", "Event-loop stalls longer than the interval", s.loop_stalls)
        for name, doc, values in (
            ("messages_published", "Messages published", s.published),
            ("messages_delivered", "Messages written to clients", s.delivered),
            ("messages_deferred", "Messages held back for paused clients (sent once they drain)",
             s.deferred),
        ):
            family = CounterMetricFamily(f"tether_{name}", doc, labels=["priority", *label])
            for p in Priority:
                family.add_metric([p.name.lower(), *value_of], values[p])
            yield family
        closes = CounterMetricFamily("tether_disconnects", "Connections ended, by close code",
                                     labels=["code", *label])
        for code, n in sorted(s.disconnects.items()):
            closes.add_metric([str(code), *value_of], n)
        yield closes
        paused = sum(1 for c in hub.registry if c.paused)
        yield gauge("paused_clients", "Clients above the backpressure mark", paused)
        yield counter("slow_closed", "Clients closed as too slow (1013)", s.slow_closed)
        yield counter("rate_limited", "Client messages or pings refused by rate", s.rate_limited)
        yield counter("abuse_closed", "Clients closed for flooding (1008)", s.abuse_closed)
        yield counter("client_errors", "Bad client messages answered with an error",
                      s.client_errors)
        yield counter("publish_duplicates",
                      "Publishes answered as a repeat of their idempotency key", s.duplicates)
        yield counter("resumes", "Resume requests", s.resumes)
        yield counter("resyncs", "Resync notices sent", s.resyncs)
        yield counter("replayed", "Messages replayed from history", s.replayed)
        yield counter("messages_recovered",
                      "Held-back messages sent from the history once their client drained",
                      s.recovered)
        state = hub.backplane.state()
        up = GaugeMetricFamily("tether_backplane_up", "1 when the backplane is reachable",
                               labels=["backplane", *label])
        up.add_metric([str(state.get("name")), *value_of],
                      1.0 if state.get("status") == "up" else 0.0)
        yield up


class Made:
    """A collector of families made already."""

    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def page(collector: HubCollector | Made) -> bytes:
    """The text format of what `collector` collects."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def render(hub: Hub, worker: str | None = None) -> bytes:
    """The metrics page for `hub` (each sample labelled `worker` when one is given)."""
    return page(HubCollector(hub, worker))


def workers_up(answered: dict[str, bool]) -> bytes:
    """The page of `tether_worker_up`: 1 for each worker that answered this scrape."""
    family = GaugeMetricFamily("tether_worker_up",
                               "1 when the worker answered this scrape in time", labels=["worker"])
    for worker, up in answered.items():
        family.add_metric([worker], 1.0 if up else 0.0)
    return page(Made(family))


def merge(pages: Iterable[bytes]) -> bytes:
    """Pages of the text format as one: each family's HELP and TYPE once, then its samples.

    The format wants every line of a family in one group, so pages cannot just
    be joined. Each page is `generate_latest`'s: per family a `# HELP`, a
    `# TYPE`, then its samples; a family seen on an earlier page keeps its
    place and gains the later pages' samples.
    """
    families: dict[bytes, list[bytes]] = {}
    lines: list[bytes] = []
    fresh = False
    for page in pages:
        for line in page.splitlines(keepends=True):
            if line.startswith(b"# HELP "):
                name = line.split(b" ", 3)[2]
                fresh = name not in families
                lines = families.setdefault(name, [])
                if fresh:
                    lines.append(line)
            elif line.startswith(b"# TYPE "):
                if fresh:
                    lines.append(line)
            else:
                lines.append(line)
    return b"".join(b"".join(lines) for lines in families.values())
