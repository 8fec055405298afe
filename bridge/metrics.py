"""Every Prometheus metric the bridge exports, defined in one place.

Prefix `ime_bridge_`, base units, `_total` for counters, bounded labels: `endpoint` (id|name),
`connection` (one per configured connection, e.g. `id-0`), `reason` and `error` (closed sets),
`topic` (a handful of topics). The README's "Operating it" table says what each one tells the person on call.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# Exchange lag spans clock skew and quiet markets; publish latency is a local round trip.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Millisecond steps up to 12 ms, so that a p99 of a few milliseconds (the latency profile's) and one near the
# throughput profile's 10 ms can be read.
LATENCY_BUCKETS = (
    *(0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.011, 0.012, 0.015),
    *(0.02, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# A handover takes a round trip to Kafka at best, the handover timeout at worst.
HANDOVER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HotHistogram(Collector):
    """A histogram for per-message use: `observe` is a bisect and a list increment (0.2 µs), where
    prometheus_client's Histogram takes a lock and walks the buckets (0.8 µs). The bridge updates and
    scrapes its metrics on one event loop, so no lock is needed."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        """Count one observation (seconds)."""
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        """The family without samples: what the registry indexes its name by (`/metrics?name[]=...`)."""
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        """Cumulative buckets, as Prometheus expects them."""
        bounds = [str(float(bound)) for bound in self._bounds] + ["+Inf"]
        cumulative = list(itertools.accumulate(self._counts))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=list(zip(bounds, cumulative, strict=True)), sum_value=self._sum
        )


class HotCounter(Collector):
    """A labelled counter for per-message or per-round use: `labels(...).inc()` is a dict lookup and an attribute
    increment (0.2 µs), where prometheus_client's takes a lock and builds the label tuple (1.2 µs); see
    HotHistogram."""

    def __init__(self, name: str, documentation: str, label: str, registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._label = label
        self._children: dict[str, _HotCount] = {}
        registry.register(self)

    def labels(self, value: str) -> _HotCount:
        """The counter for one label value."""
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _HotCount()
        return child

    def describe(self) -> Iterator[Metric]:
        """The family without samples (see HotHistogram.describe)."""
        yield CounterMetricFamily(self._name, self._documentation, labels=[self._label])

    def collect(self) -> Iterator[Metric]:
        """One sample per label value."""
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, child in self._children.items():
            family.add_metric([value], child.value)
        yield family


class HotPlainCounter(Collector):
    """An unlabelled counter for per-round use (see HotCounter)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        """Count `amount` more."""
        self.value += amount

    def describe(self) -> Iterator[Metric]:
        """The family without samples (see HotHistogram.describe)."""
        yield CounterMetricFamily(self._name, self._documentation, labels=[])

    def collect(self) -> Iterator[Metric]:
        """The one sample."""
        yield CounterMetricFamily(self._name, self._documentation, value=self.value)


class _HotCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Metrics:
    """The bridge's metrics, registered on `registry` (a fresh one per bridge by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.build_info = Info("ime_bridge_build", "Version and session of this bridge process.", registry=r)

        self.messages_received = HotCounter(
            "ime_bridge_messages_received_total", "Frames received from the IME WebSocket.", "endpoint", r
        )
        # Counted every publish round (per topic) or every bad frame: hot counters too.
        self.messages_published = HotCounter(
            "ime_bridge_messages_published_total", "Records acknowledged by Kafka.", "topic", r
        )
        self.publish_rounds = HotPlainCounter(
            "ime_bridge_publish_rounds_total",
            "Publish rounds sent to Kafka (records acknowledged / rounds = the round size).",
            r,
        )
        self.state_records_published = HotPlainCounter(
            "ime_bridge_state_records_published_total",
            "Copies of updates acknowledged on the latest-state topic (each contract's newest per publish round).",
            r,
        )
        self.messages_rejected = HotCounter(
            "ime_bridge_messages_rejected_total",
            "Frames that could not be normalized; each goes to the dead-letter topic.",
            "reason",
            r,
        )
        self.dead_letters = HotCounter(
            "ime_bridge_dead_letters_total", "Records acknowledged by Kafka on the dead-letter topic.", "reason", r
        )
        self.dead_letters_dropped = Counter(
            "ime_bridge_dead_letters_dropped_total",
            "Dead letters dropped because buffer.dead_letter_memory_bytes of them already waited in memory.",
            ["reason"],
            registry=r,
        )
        self.raw_frames_dropped = Counter(
            "ime_bridge_raw_frames_dropped_total",
            "Raw frames (kafka.raw_topic) not captured because buffer.raw_memory_bytes of them already waited.",
            registry=r,
        )
        self.produce_errors = Counter(
            "ime_bridge_produce_errors_total",
            "Records Kafka did not acknowledge, by error class.",
            ["error"],
            registry=r,
        )
        self.reconnects = Counter(
            "ime_bridge_reconnects_total",
            "WebSocket reconnections, by why the previous connection ended.",
            ["endpoint", "reason"],
            registry=r,
        )
        self.policy_rejections = Counter(
            "ime_bridge_policy_rejections_total",
            "Connections closed by the server with 1008 (policy violation).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.connection_up = Gauge(
            "ime_bridge_connection_up",
            "1 while the connection is open and subscribed.",
            ["endpoint", "connection"],
            registry=r,
        )
        self.connections = Gauge("ime_bridge_connections", "Open WebSocket connections.", registry=r)
        self.subscribed_contracts = Gauge(
            "ime_bridge_subscribed_contracts", "Contracts on open connections.", registry=r
        )
        self.last_message_timestamp = Gauge(
            "ime_bridge_last_message_timestamp_seconds",
            "Unix time of the last frame received on the connection.",
            ["connection"],
            registry=r,
        )
        self.exchange_lag = HotHistogram(
            "ime_bridge_exchange_lag_seconds", "Receive time minus the frame's exchange timestamp.", LAG_BUCKETS, r
        )
        self.publish_latency = HotHistogram(
            "ime_bridge_publish_latency_seconds",
            "From receiving a frame to Kafka acknowledging its record.",
            LATENCY_BUCKETS,
            r,
        )
        self.publish_round_duration = HotHistogram(
            "ime_bridge_publish_round_seconds",
            "From handing a publish round to the producer to its last acknowledgement (or failure): batching, the "
            "produce request and Kafka's reply. The rest of the publish latency is the wait in the buffer.",
            LATENCY_BUCKETS,
            r,
        )
        self.buffer_records = Gauge(
            "ime_bridge_buffer_records", "Records waiting between the WebSocket readers and Kafka.", registry=r
        )
        self.buffer_capacity = Gauge(
            "ime_bridge_buffer_capacity_records", "Capacity of the buffer, in records.", registry=r
        )
        self.conflated = Counter(
            "ime_bridge_conflated_total",
            "Snapshots replaced by a newer one of their contract before Kafka took them (overflow: conflate).",
            registry=r,
        )
        self.duplicates_suppressed = Counter(
            "ime_bridge_duplicates_suppressed_total",
            "Snapshots identical to the contract's previous one, not published (buffer.suppress_duplicates).",
            registry=r,
        )
        self.spool_bytes = Gauge("ime_bridge_spool_bytes", "Bytes in the spool waiting for Kafka.", registry=r)
        self.spool_records = Gauge("ime_bridge_spool_records", "Records in the spool waiting for Kafka.", registry=r)
        self.spool_full = Gauge(
            "ime_bridge_spool_full",
            "1 while the spool refuses writes (buffer.spool_max_bytes reached or the disk failing).",
            registry=r,
        )
        self.spooling = Gauge(
            "ime_bridge_spooling",
            "1 while new records go to the spool because Kafka stopped keeping up, until its backlog is sent.",
            registry=r,
        )
        self.spool_possible_duplicates = Counter(
            "ime_bridge_spool_possible_duplicates_total",
            "Records replayed from the spool at start that Kafka may hold already (committed position unreadable).",
            registry=r,
        )
        self.spool_damaged_entries = Counter(
            "ime_bridge_spool_damaged_entries_total",
            "Spool entries found torn or corrupt when the spool was opened, dropped.",
            registry=r,
        )
        self.producer_restarts = Counter(
            "ime_bridge_producer_restarts_total", "Kafka producers replaced after becoming unusable.", registry=r
        )
        self.task_failures = Counter(
            "ime_bridge_task_failures_total",
            "Unexpected exceptions in long-lived tasks: logged with their traceback, and the task went on.",
            ["task"],
            registry=r,
        )
        self.quarantined_contracts = Gauge(
            "ime_bridge_quarantined_contracts",
            "Contracts not subscribed: refused by the service (rejected) or names without an id (unresolved).",
            ["reason"],
            registry=r,
        )
        self.contract_probes = Counter(
            "ime_bridge_contract_probes_total",
            "Probe connections opened to find invalid contracts (bisect) or to re-check quarantined ones (reprobe).",
            ["purpose"],
            registry=r,
        )
        self.token_requests_held_back = Counter(
            "ime_bridge_token_requests_held_back_total",
            "Token requests that waited for ime.token_request_interval_seconds since the previous one.",
            registry=r,
        )
        self.token_refreshes = Counter(
            "ime_bridge_token_refreshes_total",
            "Token issue attempts, by outcome (ok, rejected, error).",
            ["outcome"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "ime_bridge_token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 when unknown).",
            registry=r,
        )
        self.ready = Gauge(
            "ime_bridge_ready",
            "1 while the bridge is ready (what /readyz answers 200 to), evaluated every second by the bridge itself.",
            registry=r,
        )
        self.trading_session_open = Gauge(
            "ime_bridge_trading_session_open",
            "1 while the bridge's trading calendar (ime.trading_sessions, holidays included) is open, else 0.",
            registry=r,
        )
        self.undelivered_at_shutdown = Gauge(
            "ime_bridge_undelivered_at_shutdown",
            "Records received but not acknowledged when the last shutdown finished.",
            registry=r,
        )
        self.owned_shards = Gauge(
            "ime_bridge_owned_shards",
            "Shards this replica owns now (coordination.shards when coordination is off).",
            registry=r,
        )
        self.coordination_shards = Gauge(
            "ime_bridge_coordination_shards",
            "coordination.shards when replicas share the contracts through a group, else 0.",
            registry=r,
        )
        self.rebalances = Counter(
            "ime_bridge_rebalances_total",
            "Group rebalances this replica took part in (each new assignment of shards).",
            registry=r,
        )
        self.handover_seconds = Histogram(
            "ime_bridge_handover_seconds",
            "Time to hand a shard over, by direction: release (serve it until the taker has subscribed, close its "
            "connections, deliver what is held for its contracts, write the release marker) or acquire (from "
            "assignment until its records flow).",
            ["direction"],
            buckets=HANDOVER_BUCKETS,
            registry=r,
        )
        self.handover_undelivered_records = Gauge(
            "ime_bridge_handover_undelivered_records",
            "Records of released contracts still undelivered when the last release ran out of "
            "coordination.handover_timeout_seconds (0 normally).",
            registry=r,
        )
        self.handover_markers_missing = Counter(
            "ime_bridge_handover_markers_missing_total",
            "Handover markers waited for in vain (coordination.handover_timeout_seconds ran out), by marker: "
            "release (this taker then published what it held, possibly repeating the giver's last snapshots) or "
            "subscribed (this giver then stopped serving a shard its taker may not have subscribed yet).",
            ["marker"],
            registry=r,
        )
        for marker in ("release", "subscribed"):
            self.handover_markers_missing.labels(marker)  # a series at 0 from the start
        self.event_loop_stalls = Counter(
            "ime_bridge_event_loop_stalls_total",
            "Stalls of the event loop long enough for the group to have expelled this replica (session timeout less "
            "a heartbeat interval): publishing waited for a fresh plan each time.",
            registry=r,
        )
        self.stale_records_dropped = Counter(
            "ime_bridge_stale_records_dropped_total",
            "Records not published because their shard was served by another replica while this one was expelled "
            "(they would have followed that replica's records).",
            registry=r,
        )
        self.handover_duplicates_dropped = Counter(
            "ime_bridge_handover_duplicates_dropped_total",
            "Snapshots an acquiring replica dropped because the previous owner had already published them.",
            registry=r,
        )
