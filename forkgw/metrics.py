"""The gateway's own metrics, kept in the store every worker shares.

Handles are made once per worker and cached per label value, so counting a
request is an add to a worker-private slot of shared memory (well under a
microsecond); `/metrics` (the `forkgw_metrics` directive) sums the slots of
every worker when it renders the Prometheus text.
"""

from __future__ import annotations

from forkgw.shm import ShmStore

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self, store: ShmStore):
        self.store = store
        self._requests: dict[int, object] = {}
        self._upstream_errors: dict[str, object] = {}
        self.connections = store.gauge("forkgw_connections_active")
        self.accepted = store.counter("forkgw_connections_accepted_total")
        self.duration = store.histogram("forkgw_request_duration_seconds", buckets=DURATION_BUCKETS)

    def request(self, status: int, seconds: float) -> None:
        counter = self._requests.get(status)
        if counter is None:
            counter = self._requests[status] = self.store.counter(
                "forkgw_http_requests_total", {"status": str(status)})
        counter.add(1)
        self.duration.observe(seconds)

    def upstream_error(self, upstream: str) -> None:
        counter = self._upstream_errors.get(upstream)
        if counter is None:
            counter = self._upstream_errors[upstream] = self.store.counter(
                "forkgw_upstream_errors_total", {"upstream": upstream})
        counter.add(1)

    def render(self) -> bytes:
        return self.store.render_prometheus().encode()


class FilterMeter:
    """Per filter: callbacks made and microseconds spent, by phase, and traps."""

    def __init__(self, store: ShmStore, module: str, root_id: str):
        self.store = store
        self.labels = {"filter": module, "root_id": root_id}
        self.phases: dict[str, tuple] = {}
        self.traps = store.counter("forkgw_wasm_traps_total", self.labels)

    def record_ns(self, export: str, nanoseconds: int) -> None:
        """One callback and its time (a perf_counter_ns difference): the per-callback path."""
        pair = self.phases.get(export)
        if pair is None:
            labels = {**self.labels, "phase": export.removeprefix("proxy_on_")}
            pair = self.phases[export] = (self.store.counter("forkgw_wasm_calls_total", labels),
                                          self.store.counter("forkgw_wasm_microseconds_total", labels))
        pair[0].add(1)
        pair[1].add(nanoseconds // 1000)
