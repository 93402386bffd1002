"""Shared key/value data, shared queues and metrics, behind one interface.

These back proxy_{get,set}_shared_data, the shared queue calls and the metric
calls with the semantics of cpp-host (Envoy), so that SDKs never see a status
that makes them panic.  Two implementations of the same methods:

- `ShmShared`: over a `forkgw.shm.ShmStore` that the master created before
  forking, so every worker sees the same data, queues and metrics.  One per
  worker; its `wake` socket belongs in the worker's selector (readable ->
  Runtime.tick(), whose take_ready() drains it).
- `LocalShared`: one per Runtime, i.e. per worker process; state survives VM
  rebuilds but is not visible to other workers.  The fallback when the
  gateway runs without a store (and the reference for the statuses).

Semantics (both):
- Shared data: one table per vm_id (here: the module name); every successful
  set takes a new CAS from a counter (never 0); cas 0 = unconditional; a key
  that does not exist is created whatever the cas.
- Queues: (vm_id, name) -> id; registering again keeps the data and moves
  ownership to the registering root context, which gets
  proxy_on_queue_ready from Runtime.tick() after an enqueue.
- Metrics: one namespace; defining a name again returns the same id.
  Counters never go below zero; histograms record samples and cannot be read.
  proxy_record_metric on a counter: LocalShared sets it, ShmShared adds to it
  (Envoy's behaviour; a counter summed over workers cannot be set).
"""

from __future__ import annotations

from collections import deque

from .. import shm
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


class ReadyQueue:
    """What take_ready() hands Runtime.tick(): a queue id and its owner here."""

    __slots__ = ("id", "owner")

    def __init__(self, queue_id: int, owner):
        self.id = queue_id
        self.owner = owner


class ShmShared:
    """LocalShared's interface over a shared-memory store that every worker sees.

    Statuses: a full store (eviction=none, or queue items that do not fit) is
    INTERNAL_FAILURE, a key or value over the store's limits BAD_ARGUMENT.
    register_queue/define_metric cannot fail in the ABI's eyes: when the
    store's tables are full they return id 0, which every later call answers
    with NOT_FOUND.
    """

    def __init__(self, store: "shm.ShmStore"):
        self.store = store
        self.wake = store.attach()  # idempotent: one socket and metrics slot per process
        self.owners: dict[int, object] = {}  # queue id -> RootContext registered in this worker
        self.ready: list = []  # read by Runtime.tick(); other workers' enqueues arrive on `wake`

    def fileno(self) -> int:
        return self.wake.fileno()

    # -- key/value ------------------------------------------------------------

    def get_data(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        return self.store.get(vm_id, key)

    def set_data(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        try:
            return Status.OK if self.store.set(vm_id, key, value, cas & _U32) else Status.CAS_MISMATCH
        except shm.TooLarge:
            return Status.BAD_ARGUMENT
        except shm.StoreFull:
            return Status.INTERNAL_FAILURE

    # -- queues -------------------------------------------------------------

    def register_queue(self, vm_id: str, name: bytes, owner) -> int:
        try:
            queue_id = self.store.register_queue(vm_id, name)
        except (shm.TooLarge, shm.StoreFull):
            return 0
        self.owners[queue_id] = owner
        return queue_id

    def resolve_queue(self, vm_id: str, name: bytes) -> int | None:
        try:
            return self.store.resolve_queue(vm_id, name)
        except (shm.NotFound, shm.TooLarge):
            return None

    def enqueue(self, queue_id: int, data: bytes) -> Status:
        try:
            self.store.enqueue(queue_id & _U32, data)
        except shm.NotFound:
            return Status.NOT_FOUND
        except shm.TooLarge:
            return Status.BAD_ARGUMENT
        except shm.StoreFull:
            return Status.INTERNAL_FAILURE
        return Status.OK

    def dequeue(self, queue_id: int) -> bytes | Status:
        try:
            return self.store.dequeue(queue_id & _U32)
        except shm.NotFound:
            return Status.NOT_FOUND
        except shm.Empty:
            return Status.EMPTY

    def take_ready(self) -> list[ReadyQueue]:
        """This worker's queues with new items (drains the wake socket; no lock if it was empty)."""
        owners = self.owners
        return [ReadyQueue(queue_id, owners[queue_id]) for queue_id in self.store.ready_queues()
                if queue_id in owners]

    # -- metrics --------------------------------------------------------------

    def define_metric(self, metric_type: int, name: bytes) -> int:
        try:
            return self.store.define_metric(int(metric_type), name)
        except (shm.TooLarge, shm.StoreFull, ValueError):
            return 0

    def increment_metric(self, metric_id: int, delta: int) -> Status:
        return self._update_metric(self.store.increment, metric_id, delta)

    def record_metric(self, metric_id: int, value: int) -> Status:
        return self._update_metric(self.store.record, metric_id, value)

    @staticmethod
    def _update_metric(update, metric_id: int, value: int) -> Status:
        try:
            update(metric_id & _U32, value)
        except shm.NotFound:
            return Status.NOT_FOUND
        except ValueError:
            return Status.BAD_ARGUMENT
        return Status.OK

    def get_metric(self, metric_id: int) -> int | Status:
        try:
            return self.store.get_metric(metric_id & _U32) & _U64
        except shm.NotFound:
            return Status.NOT_FOUND
        except ValueError:
            return Status.BAD_ARGUMENT
