"""Scheduling policies: the order of the waiting queue plus the choice of a preemption victim.

A policy is one small class behind this interface; the scheduler never branches on its name.

  fcfs      arrival order; the victim is the latest arrival.
  priority  lower `priority` first, ties by arrival; the victim is the lowest-priority (then latest)
            running request, and a waiting request that can't be admitted preempts a running
            request of strictly lower priority.
  sjf       shortest job first, job size = prompt tokens + max_tokens (the work a request can cost,
            known at arrival; output length itself is unknown). Aging: the key is
            size - sjf_aging_rate * seconds waited, i.e. (size + rate * arrival) - rate * now; the
            `- rate * now` term is the same for everyone, so the order is a static key
            size + rate * arrival. Starvation bound: a request of size S is passed only by requests
            arriving less than (S - S_min) / rate seconds after it (S_min >= 2), so it waits at most
            for those plus whatever was queued ahead of it. Victim: the running request with the
            most work left.
  fair      round-robin across tenants: each admission takes the next request of the next tenant
            in turn, so a tenant with 100 queued requests gets one turn per round like everyone
            else. Victim: the latest arrival of the tenant holding the most running requests.
"""
from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator

from tokenmill.request import Request


class SchedulingPolicy(ABC):
    """The waiting queue of one scheduling policy."""

    name: str

    @abstractmethod
    def add(self, request: Request) -> None:
        """A new request arrives."""

    @abstractmethod
    def add_preempted(self, request: Request) -> None:
        """A running request was preempted and must wait again."""

    @abstractmethod
    def peek(self) -> Request:
        """The request to admit next (the queue is not empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the request peek() names."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Take a waiting request out (it was aborted)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    @abstractmethod
    def choose_victim(self, candidates: list[Request]) -> Request:
        """Which of `candidates` (running, not yet scheduled this step) to preempt."""

    def preempt_for(self, request: Request, running: list[Request]) -> Request | None:
        """A running request to preempt so that waiting `request` can be admitted, or None."""
        return None


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; preempt the latest arrival."""

    name = "fcfs"

    def __init__(self, config=None) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        # It arrived before everything still waiting: it goes back to the front.
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def choose_victim(self, candidates: list[Request]) -> Request:
        # reversed: on equal arrival times, the one admitted last.
        return max(reversed(candidates), key=lambda r: r.times.arrival_time)


class _KeyedPolicy(SchedulingPolicy):
    """A waiting queue kept sorted by a static per-request key (smallest first)."""

    def __init__(self) -> None:
        self._items: list[tuple] = []  # (key, seq, request)
        self._seq = itertools.count()

    @abstractmethod
    def key(self, request: Request) -> tuple:
        """The sort key of a waiting request; fixed while it waits."""

    def add(self, request: Request) -> None:
        bisect.insort(self._items, (self.key(request), next(self._seq), request))

    add_preempted = add  # its key (arrival-based) already puts it where it belongs

    def peek(self) -> Request:
        return self._items[0][2]

    def pop(self) -> Request:
        return self._items.pop(0)[2]

    def remove(self, request: Request) -> None:
        for i, item in enumerate(self._items):
            if item[2] is request:
                del self._items[i]
                return
        raise ValueError(f"{request.request_id} is not waiting")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return (item[2] for item in self._items)


class PriorityPolicy(_KeyedPolicy):
    name = "priority"

    def __init__(self, config=None) -> None:
        super().__init__()

    def key(self, request: Request) -> tuple:
        return (request.priority, request.times.arrival_time)

    def choose_victim(self, candidates: list[Request]) -> Request:
        return max(reversed(candidates), key=self.key)

    def preempt_for(self, request: Request, running: list[Request]) -> Request | None:
        lower = [r for r in running if r.priority > request.priority]
        return self.choose_victim(lower) if lower else None


class SJFPolicy(_KeyedPolicy):
    name = "sjf"

    def __init__(self, config=None) -> None:
        super().__init__()
        self.aging_rate = config.sjf_aging_rate if config is not None else 50.0

    @staticmethod
    def job_size(request: Request) -> int:
        return request.num_prompt_tokens + request.sampling_params.max_tokens

    def key(self, request: Request) -> tuple:
        return (self.job_size(request) + self.aging_rate * request.times.arrival_time,
                request.times.arrival_time)

    def choose_victim(self, candidates: list[Request]) -> Request:
        def work_left(r: Request) -> int:
            return (r.num_tokens - r.num_computed_tokens) + (r.sampling_params.max_tokens - r.num_output_tokens)
        return max(reversed(candidates), key=work_left)


class FairPolicy(SchedulingPolicy):
    name = "fair"

    def __init__(self, config=None) -> None:
        # tenant -> its waiting requests; the first tenant in the dict has the next turn.
        self._queues: OrderedDict[str, deque[Request]] = OrderedDict()
        self._len = 0

    def add(self, request: Request) -> None:
        if request.tenant not in self._queues:
            self._queues[request.tenant] = deque()
        self._queues[request.tenant].append(request)
        self._len += 1

    def add_preempted(self, request: Request) -> None:
        # It had its turn already: back to the front of its tenant's queue, and that tenant next.
        if request.tenant not in self._queues:
            self._queues[request.tenant] = deque()
        self._queues[request.tenant].appendleft(request)
        self._queues.move_to_end(request.tenant, last=False)
        self._len += 1

    def peek(self) -> Request:
        return next(iter(self._queues.values()))[0]

    def pop(self) -> Request:
        tenant, queue = next(iter(self._queues.items()))
        request = queue.popleft()
        self._len -= 1
        if queue:
            self._queues.move_to_end(tenant)  # next tenant's turn
        else:
            del self._queues[tenant]
        return request

    def remove(self, request: Request) -> None:
        queue = self._queues[request.tenant]
        queue.remove(request)
        self._len -= 1
        if not queue:
            del self._queues[request.tenant]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        # Admission order: one request of each tenant per round.
        queues = [list(q) for q in self._queues.values()]
        for i in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if i < len(q):
                    yield q[i]

    def choose_victim(self, candidates: list[Request]) -> Request:
        per_tenant = Counter(r.tenant for r in candidates)
        heaviest = max(per_tenant.values())
        pool = [r for r in candidates if per_tenant[r.tenant] == heaviest]
        return max(reversed(pool), key=lambda r: r.times.arrival_time)


POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (FCFSPolicy, PriorityPolicy, SJFPolicy, FairPolicy)}


def make_policy(name: str, config=None) -> SchedulingPolicy:
    """The policy called `name`; `config` (an EngineConfig) supplies its knobs (sjf_aging_rate)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}") from None
    return cls(config)
