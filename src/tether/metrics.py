"""GET /metrics: Prometheus text format, read from the hub's counters at scrape time.

Nothing here runs on the hot path: the hub keeps plain integer counters (and RTT
bucket counts) and this collector turns them into metric families when
Prometheus scrapes, with the official client library's exposition format.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        s = hub.stats
        hb = hub.heartbeat

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"tether_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tether_{name}", doc, value=value)

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
        rtt = HistogramMetricFamily("tether_rtt_seconds", "Ping round-trip time",
                                    buckets=buckets, sum_value=s.rtt_sum)
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
            family = CounterMetricFamily(f"tether_{name}", doc, labels=["priority"])
            for p in Priority:
                family.add_metric([p.name.lower()], values[p])
            yield family
        closes = CounterMetricFamily("tether_disconnects", "Connections ended, by close code",
                                     labels=["code"])
        for code, n in sorted(s.disconnects.items()):
            closes.add_metric([str(code)], n)
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
                               labels=["backplane"])
        up.add_metric([str(state.get("name"))], 1.0 if state.get("status") == "up" else 0.0)
        yield up


def render(hub: Hub) -> bytes:
    """The metrics page for `hub`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return generate_latest(registry)
