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
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._log, self._stop = log, threading.Event()
        self._thread = threading.Thread(target=self._relay, daemon=True, name="puma-live-lines")

    def _relay(self) -> None:
        from ray.util.queue import Empty
        while not self._stop.is_set():
            try:
                self._log(self.queue.get(timeout=0.5))
            except Empty:
                pass

    def __enter__(self) -> "LiveLines":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        while not self.queue.empty():  # what arrived after the last poll
            self._log(self.queue.get_nowait())
        self.queue.shutdown()


def sender(queue) -> Callable[[str], None]:
    """The worker's log function: lines into the queue; never fails the training it reports on (a lost queue
    loses lines, not the fit)."""
    def send(line: str) -> None:
        try:
            queue.put(line)
        except Exception:  # noqa: BLE001 - any Ray error here (actor gone) must not stop a fit
            pass
    return send
