"""Runs under the Dask environment being tested (its own python, no dasklab): a client holding results and keeping
the scheduler busy, driven by one command per stdin line and answering one JSON line each."""

import json
import sys
import time

from distributed import Client


def triple(x):
    return 3 * x


def slow_inc(x):
    time.sleep(0.5)
    return x + 1


def memory_transitions(dask_scheduler):
    """Per key, how often it reached memory, from the scheduler's transition log; and whether the log overflowed."""
    log, counts = dask_scheduler.transition_log, {}
    for key, _start, finish, *_ in log:
        if finish == "memory":
            counts[str(key)] = counts.get(str(key), 0) + 1
    return counts, log.maxlen is not None and len(log) >= log.maxlen


def main(address: str) -> None:
    client = Client(address, timeout=30)
    held, running = [], []
    for line in sys.stdin:
        command, *args = line.split()
        if command == "hold":  # results spread over the workers, kept in their memory
            held = client.map(triple, range(int(args[0])), pure=False)
            client.gather(held)
            reply = {"held": len(held)}
        elif command == "load":  # tasks still computing while something happens
            running = client.map(slow_inc, range(int(args[0])), pure=False)
            reply = {"running": len(running)}
        elif command == "gather":
            reply = {"held_sum": sum(client.gather(held)), "running_sum": sum(client.gather(running))}
        elif command == "release":
            held, running = [], []
            reply = {"released": True}
        elif command == "recomputed":
            counts, overflowed = client.run_on_scheduler(memory_transitions)
            reply = {"recomputed": sum(n - 1 for n in counts.values()), "overflowed": overflowed}
        elif command == "version":
            import distributed
            reply = {"version": distributed.__version__}
        else:
            reply = {"error": f"unknown command {command}"}
        print(json.dumps(reply), flush=True)
    client.close()


if __name__ == "__main__":
    main(sys.argv[1])
