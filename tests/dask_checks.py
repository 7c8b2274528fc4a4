"""Test helpers that ask a real Dask scheduler what happened: tasks computed more than once, processes left."""

import sys

import cloudpickle
import psutil

# enough room in the scheduler's transition log for every transition of a test's tasks (default 1000)
LOG_LENGTH_ENV = {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "100000"}


def _memory_transitions(dask_scheduler) -> tuple[dict, bool]:
    """Per key, how often it reached memory (its transition log); and whether the log overflowed."""
    log = dask_scheduler.transition_log
    counts: dict[str, int] = {}
    for key, _start, finish, *_ in log:
        if finish == "memory":
            counts[str(key)] = counts.get(str(key), 0) + 1
    return counts, log.maxlen is not None and len(log) >= log.maxlen


def recomputed(client) -> int:
    """Tasks that reached memory more than once: computed again (a copy moved to a survivor is no transition)."""
    counts, overflowed = client.run_on_scheduler(_memory_transitions)
    assert not overflowed, "the scheduler's transition log overflowed: set LOG_LENGTH_ENV on it"
    return sum(n - 1 for n in counts.values())


def process_tree(pids) -> list[psutil.Process]:
    """The processes `pids` and everything they started (a nanny's worker), to check none is left."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def alive(processes) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scheduler cannot import tests/
