"""Reaction: load onset → scale-up request in the local lab (real Dask), over several bursts.

Run: python benchmarks/reaction.py [--poll 1.0] [--trials 5]   (goal: every reaction ≤ poll + 0.5 s)
"""

import argparse
import json
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time

from distributed import Client

from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileEvents
from dasklab.core.config import Config
from dasklab.core.messages import parse_command
from dasklab.core.reconcile import Controller


class Decisions(logging.Handler):
    """Timestamps of the controller's scale-up decisions, as they are logged."""

    def __init__(self):
        super().__init__()
        self.ups: list[float] = []

    def emit(self, record):
        if '"action": "scale-up"' in record.getMessage():
            self.ups.append(time.time())


def _sleep(x):
    time.sleep(1.0)
    return x


class _Stopped(Exception):
    """Raised in the tick's pause between passes once the benchmark is done, to end the tick."""


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind so the lab's processes are stopped
    ap = argparse.ArgumentParser()
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="dasklab-bench-")
    backend = LocalBackend(home)
    ctl = Controller(backend, FileEvents(f"{home}/status.jsonl"),
                     Config(poll_s=a.poll, confirm_s=1.0, cooldown_s=0.0, tick_budget_s=3600))
    decisions = Decisions()
    logging.getLogger("dasklab").addHandler(decisions)
    logging.getLogger("dasklab").setLevel(logging.INFO)
    ctl.handle(parse_command(json.dumps({"type": "start-lab", "lab": "bench", "owner": "bench",
                                         "workers": {"initial": 1, "min": 1, "max": 4}})))
    stop = threading.Event()
    try:
        while backend.fetch_lab("bench").state.phase != "ready":
            ctl.reconcile_all("reconcile")
            time.sleep(0.2)
        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Stopped

        def ticking() -> None:
            try:
                ctl.tick(parse_command(b'{"type": "reconcile"}'), "bench")
            except _Stopped:
                pass

        ctl.sleep = sleep
        loop = threading.Thread(target=ticking, daemon=True)
        loop.start()
        reactions = []
        with Client(backend.connection_info(backend.fetch_lab("bench"))["scheduler"]) as client:
            for trial in range(a.trials):
                while backend.fetch_lab("bench").state.target_workers != 1:
                    time.sleep(0.1)
                time.sleep(a.poll * (trial / a.trials))  # spread onsets over the polling phase
                seen = len(decisions.ups)
                onset = time.time()
                futures = client.map(_sleep, range(40), pure=False)
                while len(decisions.ups) == seen:
                    time.sleep(0.01)
                reactions.append(decisions.ups[seen] - onset)
                client.cancel(futures)
        stop.set()
        loop.join(timeout=10)
    finally:
        stop.set()
        backend.stop_all()
    goal = a.poll + 0.5
    print(f"poll interval {a.poll:.1f}s, {a.trials} bursts: reaction (load onset → scale-up request)")
    print(f"  median {statistics.median(reactions):.2f}s  max {max(reactions):.2f}s  "
          f"all: {', '.join(f'{r:.2f}' for r in reactions)}")
    print(f"  max/goal {max(reactions) / goal:.2f} (goal ≤ poll + 0.5 s = {goal:.1f}s) → "
          f"{'met' if max(reactions) <= goal else 'NOT met'}")


if __name__ == "__main__":
    main()
