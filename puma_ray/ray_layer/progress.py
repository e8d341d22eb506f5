"""Lines from Ray workers on the driver's console as they happen (a Ray Train fit's epochs, not after the fit).

A Ray Queue actor (0 CPU, on the driver's node: it must outlive any worker node) that rank 0 puts its lines into;
a driver thread drains it while the blocking call (trainer.fit()) runs. Worker output itself stays off the console
(log_to_driver off): only the lines we send arrive.
"""
from __future__ import annotations

import threading
from typing import Callable


class LiveLines:
    def __init__(self, log: Callable[[str], None]):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        # hard affinity: a lost worker node must not take the queue with it (the driver's node going ends the job)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._log, self._stop = log, threading.Event()
        self.lost = False  # the queue actor died: the caller logs the fit's history afterwards instead
        self._thread = threading.Thread(target=self._relay, daemon=True, name="puma-live-lines")

    def _relay(self) -> None:
        from ray.util.queue import Empty
        while not self._stop.is_set() and not self.lost:
            try:
                self._log(self.queue.get(timeout=0.5))
            except Empty:
                pass
            except Exception:  # noqa: BLE001 - the queue actor is gone: lines are lost, never the fit
                self.lost = True

    def __enter__(self) -> "LiveLines":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            while not self.lost and not self.queue.empty():  # what arrived after the last poll
                self._log(self.queue.get_nowait())
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - as in _relay
            self.lost = True


def sender(queue) -> Callable[[str], None]:
    """The worker's log function: lines into the queue; never fails the training it reports on (a lost queue
    loses lines, not the fit)."""
    def send(line: str) -> None:
        try:
            queue.put(line)
        except Exception:  # noqa: BLE001 - any Ray error here (actor gone) must not stop a fit
            pass
    return send


class BlockProgress:
    """A pass over record blocks on an actor pool says how far it is: blocks done of all, records, records/s, at
    most every `every_s` (the lean evaluation of 1M users ran 20 minutes between its first and last line)."""

    def __init__(self, what: str, blocks: int, log: Callable[[str], None] | None, every_s: float = 15.0):
        import time
        self.what, self.blocks, self.log, self.every_s = what, blocks, log, every_s
        self.done = self.records = 0
        self.start = self.last = time.perf_counter()

    def add(self, records: int) -> None:
        import time
        self.done, self.records = self.done + 1, self.records + int(records)
        now = time.perf_counter()
        if self.log is not None and (now - self.last >= self.every_s or self.done == self.blocks):
            self.last = now
            self.log(f"  {self.what}: {self.done} of {self.blocks} blocks, {self.records:,} records, "
                     f"{self.records / max(now - self.start, 1e-9):,.0f} records/s")
