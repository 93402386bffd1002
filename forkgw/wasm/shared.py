"""Shared key/value data, shared queues and metrics — per worker for now.

These back proxy_{get,set}_shared_data, the shared queue calls and the metric
calls with the semantics of cpp-host (Envoy), so that SDKs never see a status
that makes them panic.  Scope: one `LocalShared` per Runtime, i.e. per
worker process; state survives VM rebuilds but is not visible to other
workers (a cross-worker store in shared memory is a later issue and will keep
this interface).

- Shared data: one table per vm_id (here: the module name); every successful
  set takes a new CAS from a counter (never 0); cas 0 = unconditional; a key
  that does not exist is created whatever the cas.
- Queues: (vm_id, name) -> id; registering again keeps the data and moves
  ownership to the registering root context, which gets
  proxy_on_queue_ready from Runtime.tick() after an enqueue.
- Metrics: one namespace; defining a name again returns the same id.
  Counters never go below zero; histograms record samples and cannot be read.
"""

from __future__ import annotations

from collections import deque

from .abi import MetricType, Status

_U64 = 0xFFFFFFFFFFFFFFFF
_U32 = 0xFFFFFFFF


class Queue:
    __slots__ = ("id", "owner", "items")

    def __init__(self, queue_id: int, owner):
        self.id = queue_id
        self.owner = owner  # RootContext that gets proxy_on_queue_ready
        self.items: deque[bytes] = deque()


class Metric:
    __slots__ = ("id", "type", "name", "value", "samples")

    def __init__(self, metric_id: int, metric_type: int, name: bytes):
        self.id = metric_id
        self.type = metric_type
        self.name = name
        self.value = 0
        self.samples = 0


class LocalShared:
    def __init__(self):
        self.data: dict[tuple[str, bytes], tuple[bytes, int]] = {}
        self.cas = 0
        self.queues: dict[tuple[str, bytes], Queue] = {}
        self.queues_by_id: dict[int, Queue] = {}
        self.ready: list[Queue] = []  # queues with data for their owner, in order
        self.metrics: dict[bytes, Metric] = {}
        self.metrics_by_id: dict[int, Metric] = {}

    # -- key/value ------------------------------------------------------------

    def get_data(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        return self.data.get((vm_id, key))

    def set_data(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        current = self.data.get((vm_id, key))
        if current is not None and cas != 0 and cas != current[1]:
            return Status.CAS_MISMATCH
        self.cas = self.cas % _U32 + 1
        self.data[(vm_id, key)] = (value, self.cas)
        return Status.OK

    # -- queues -------------------------------------------------------------

    def register_queue(self, vm_id: str, name: bytes, owner) -> int:
        queue = self.queues.get((vm_id, name))
        if queue is None:
            queue = Queue(len(self.queues_by_id) + 1, owner)
            self.queues[(vm_id, name)] = queue
            self.queues_by_id[queue.id] = queue
        queue.owner = owner
        return queue.id

    def resolve_queue(self, vm_id: str, name: bytes) -> int | None:
        queue = self.queues.get((vm_id, name))
        return None if queue is None else queue.id

    def enqueue(self, queue_id: int, data: bytes) -> Status:
        queue = self.queues_by_id.get(queue_id)
        if queue is None:
            return Status.NOT_FOUND
        queue.items.append(data)
        if queue not in self.ready:
            self.ready.append(queue)
        return Status.OK

    def dequeue(self, queue_id: int) -> bytes | Status:
        queue = self.queues_by_id.get(queue_id)
        if queue is None:
            return Status.NOT_FOUND
        if not queue.items:
            return Status.EMPTY
        return queue.items.popleft()

    def take_ready(self) -> list[Queue]:
        ready, self.ready = self.ready, []
        return ready

    # -- metrics --------------------------------------------------------------

    def define_metric(self, metric_type: int, name: bytes) -> int:
        metric = self.metrics.get(name)
        if metric is None:
            metric = Metric(len(self.metrics_by_id) + 1, metric_type, name)
            self.metrics[name] = metric
            self.metrics_by_id[metric.id] = metric
        return metric.id

    def increment_metric(self, metric_id: int, delta: int) -> Status:
        metric = self.metrics_by_id.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT
        if metric.type == MetricType.COUNTER and delta < 0:
            return Status.BAD_ARGUMENT
        metric.value = (metric.value + delta) & _U64
        return Status.OK

    def record_metric(self, metric_id: int, value: int) -> Status:
        metric = self.metrics_by_id.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.HISTOGRAM:
            metric.samples += 1
        metric.value = value
        return Status.OK

    def get_metric(self, metric_id: int) -> int | Status:
        metric = self.metrics_by_id.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.HISTOGRAM:
            return Status.BAD_ARGUMENT
        return metric.value
