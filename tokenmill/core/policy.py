"""Scheduling policies: the order of the waiting queue plus the choice of a preemption victim.

A policy is one small class behind this interface; the scheduler never branches on its name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
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


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; preempt the latest arrival."""

    name = "fcfs"

    def __init__(self) -> None:
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


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy}


def make_policy(name: str, config=None) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"scheduling_policy must be one of {sorted(POLICIES)}, got {name!r}") from None
