"""Shared state: a JSON-valued mapping owned by the loop thread and changed under one asyncio.Lock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

# Called with the keys changed by one locked section, after it ends, so the store can persist them.
ChangeListener = Callable[[Mapping[str, Any], frozenset[str]], None]


class _Tracked(MutableMapping[str, Any]):
    """The view handed out inside ``locked()``: records which keys were set or deleted."""

    __slots__ = ("_data", "changed")

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.changed: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, dict | list):
            # It may be changed in place (state["seen"].append(x)): persist it as changed.
            self.changed.add(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"shared state keys are strings, got {key!r}")
        # Fail at the assignment, inside the job, not later in the store where no job is to blame.
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"shared state value for {key!r} must be JSON-serialisable: {exc}"
            ) from None
        self._data[key] = value
        self.changed.add(key)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.changed.add(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class SharedState:
    """State shared by all jobs, living on the event-loop thread.

    Reads (``get``, ``snapshot``) need no lock: only the loop thread ever touches the data, so a
    read never sees a half-made change. Writes go through ``locked()``, which holds the
    ``asyncio.Lock`` so that a read-modify-write spanning an ``await`` is not interleaved with
    another job's. Thread and process jobs never see this object: they return a result and the
    daemon records it here on the loop.
    """

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(initial or {})
        self.lock = asyncio.Lock()
        self._listeners: list[ChangeListener] = []
        # Run results: the ticket of the newest run end not yet applied, per key. A run's
        # result waits for the lock while a job holds it, and may be applied after a newer
        # run's result; the ticket says which one is the newest.
        self._tickets = 0
        self._newest: dict[str, int] = {}

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def get(self, key: str, default: Any = None) -> Any:
        """Read without the lock. Change values only inside ``locked()``: a list or dict got
        here and changed in place would not be persisted."""
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def snapshot(self) -> dict[str, Any]:
        """A deep copy, safe to hand to another thread."""
        result: dict[str, Any] = json.loads(json.dumps(self._data))
        return result

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[MutableMapping[str, Any]]:
        """Hold the lock and yield a mutable view; the changes are persisted when the block ends."""
        async with self.lock:
            view = _Tracked(self._data)
            try:
                yield view
            finally:
                if view.changed:
                    self._notify(frozenset(view.changed))

    def set_unlocked(self, key: str, value: Any, *, checked: bool = False) -> None:
        """Record one value from the loop thread without awaiting the lock.

        For the daemon itself (results of thread and process runs), which runs on the loop
        thread between awaits and so cannot interleave with a locked section's own step.
        ``checked``: the caller has already serialised ``value`` to JSON.
        """
        if not checked:
            json.dumps(value)
        self._data[key] = value
        self._notify(frozenset((key,)))

    def result_ticket(self, key: str) -> int:
        """Taken when a run ends whose result is to go under ``key``: makes every ticket
        taken before it for that key stale."""
        self._tickets += 1
        self._newest[key] = self._tickets
        return self._tickets

    def set_result(self, key: str, value: Any, ticket: int) -> bool:
        """Record a run's result (already serialised to JSON by the caller) unless a run
        that ended after it has taken a ticket for the same key since: the last run to END
        wins, whatever order the writes reach here in. Whether it was recorded."""
        if self._newest.get(key) != ticket:
            return False
        del self._newest[key]
        self.set_unlocked(key, value, checked=True)
        return True

    def _notify(self, keys: frozenset[str]) -> None:
        for listener in self._listeners:
            listener(self._data, keys)
