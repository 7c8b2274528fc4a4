"""The fleet pass: a tick schedules every lab's and every class's step, each contained, so one's trouble stays there."""

import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from dasklab.core import logs
from dasklab.core.context import Part, poisoned
from dasklab.core.errors import PermanentError, RateLimited, StepRefused, TransientError
from dasklab.core.messages import NightlyTeardown, Reconcile, TeardownIdle
from dasklab.core.model import Lab
from dasklab.core.policy import plan_tick_reach


GOLDEN = (5 ** 0.5 - 1) / 2  # the rotation of the pass's starting point per minute (see reconcile_all)


class Fleet(Part):
    """Ticks: passes over every lab (concurrently, within a deadline) and every class."""

    def tick(self, cmd: Reconcile | TeardownIdle | NightlyTeardown, mid: str, published: float | None = None) -> None:
        """One timer tick over every managed lab. A reconcile tick first reads the dead letters, then keeps polling
        for its budget; the next pass retries what failed. A teardown tick has one pass: if a lab failed or was not
        reached before the invocation's deadline, the tick raises to be redelivered; it acts only on the labs that
        existed when it was `published` (its publishTime)."""
        start = self.clock()
        if isinstance(cmd, Reconcile):  # first the dead letters: a stop among them is recorded, the passes take it
            self.c.dead_letter_pass.drain(mid)
        budget = (cmd.budget_seconds if isinstance(cmd, Reconcile) and cmd.budget_seconds is not None
                  else self.config.tick_budget_s if isinstance(cmd, Reconcile) else 0.0)
        deadline = start + budget
        # Once per tick (a minute: Cloud Scheduler's period) each lab that could be idle is asked since when it is,
        # on the first pass past a point of the tick's first half fixed by its name: spread over the passes,
        # never on every poll. `asked` only saves calls within this invocation; losing it costs one more call.
        asked: set[str] = set()
        spread = budget / 2

        def idle(name: str) -> bool:
            if name in asked or self.clock() - start < spread * (zlib.crc32(name.encode()) % 1000) / 1000:
                return False
            asked.add(name)
            return True

        while True:
            left = self.reconcile_all(cmd.type, mid, deadline=max(deadline, start + self.config.pass_budget_s),
                                      idle=idle if isinstance(cmd, Reconcile) else None, published=published)
            if isinstance(cmd, Reconcile):
                left += self.reconcile_classes(mid)
            if left and not isinstance(cmd, Reconcile):
                raise TransientError(f"{cmd.type}: retry for {', '.join(left)}")
            if self.clock() + self.config.poll_s >= deadline:
                return
            self.sleep(self.config.poll_s)

    def reconcile_all(self, tick: str, mid: str = "", workers: int = 64, deadline: float | None = None,
                      idle: bool | Callable[[str], bool] | None = None, published: float | None = None) -> list[str]:
        """One pass over all labs, `workers` at a time, so no lab waits on another's slow call. A lab not yet
        started when `deadline` passes is left for the next pass. The pass starts at a point of the ring of labs
        that moves by the golden ratio of the ring every minute, so successive starts spread evenly: a fleet of
        which a pass reaches a fraction f has every lab reached within about 1.5/f minutes, with no state kept.
        With `idle` (default: on teardown ticks; or a predicate of the lab's name) labs without work are asked since
        when they are idle. A lab created after `published` (the tick's publishTime) is spared by a teardown tick.
        Returns the labs failed or left over."""
        labs = self.backend.fetch_labs()
        missing = [f"zone {z}" for z in getattr(self.backend, "missing_zones", ())]
        if missing:  # the listing left labs out: they are neither dropped nor reported done
            logs.emit("WARNING", action=tick, reason=f"pass incomplete: {', '.join(missing)} did not answer",
                      message_id=mid)
        for (kind, name), error in sorted(poisoned(self.backend).items()):  # contained: the others go on
            if kind == "lab":
                self.c.labs.contain(name, "", str(error), mid)
        if labs:
            turn = int((self.clock() // 60 * GOLDEN) % 1 * len(labs))
            labs = labs[turn:] + labs[:turn]

        def one(lab: Lab) -> bool:
            if deadline is not None and self.clock() >= deadline:
                return False  # not started: the next pass or tick takes it
            if self.clock() < lab.state.backoff_until:
                return False  # rate limited a moment ago: this pass leaves it alone
            acts, why = plan_tick_reach(tick, published, lab.state.created_at)
            if not acts:  # done with: a redelivery of this tick spares it as well
                logs.emit("INFO", lab=lab.name, action="spare", tick=tick, reason=why, message_id=mid)
                return True
            return self._reconcile_safely(lab, tick, mid, idle(lab.name) if callable(idle) else idle)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(labs)))) as pool:
            results = list(pool.map(one, labs))
        return [lab.name for lab, ok in zip(labs, results) if not ok] + missing

    def _reconcile_safely(self, lab: Lab, tick: str, mid: str, idle: bool | None = None) -> bool:
        try:
            self.c.labs.reconcile_lab(lab, tick, mid, idle)
            if lab.state.backoff_count:  # the rate limit is over: said on the record, for every instance
                self._record_backoff(lab.name, 0.0, 0, mid)
            return True
        except RateLimited as e:  # backoff: 1, 2, 4 … times the service's hint, at most 5 minutes
            wait = min(300.0, e.retry_after_s * 2 ** lab.state.backoff_count)
            logs.emit("WARNING", lab=lab.name, action=tick, reason=f"rate limited, next try in {wait:g}s: {e}",
                      message_id=mid)
            self._record_backoff(lab.name, self.clock() + wait, lab.state.backoff_count + 1, mid)
            return False
        except TransientError as e:  # other labs go on; this one is retried
            logs.emit("WARNING", lab=lab.name, action=tick, reason=f"retry later: {e}", message_id=mid)
            return False
        except StepRefused as e:  # a step refused for a cause outside the lab: the lab holds, says why, tries later
            self.c.labs.contain(lab.name, lab.spec.owner, f"held: {e}", mid, cause="refused")
            return True
        except PermanentError as e:  # refused for good (a permission, a quota): the lab fails, teardown follows
            self.c.labs.apply_failed(lab, str(e), mid)
            return True
        except Exception as e:  # noqa: BLE001 -- the fleet pass is each lab's entry point: one lab's bug stays there
            self.c.labs.contain(lab.name, lab.spec.owner, f"{type(e).__name__}: {e}", mid, trace=traceback.format_exc())
            return False  # unclassified: a teardown tick is redelivered for this lab (the others are done)

    def _record_backoff(self, name: str, until: float, count: int, mid: str) -> None:
        """The backoff after a rate limit lives on the lab's record (any instance's next pass honours it)."""
        try:
            lab = self.backend.fetch_lab(name)
            if lab is not None:
                self.backend.apply_record(lab.with_state(backoff_until=until, backoff_count=count))
        except TransientError as e:  # the store is busy too: the next pass meets the limit again
            logs.emit("WARNING", lab=name, action="backoff", reason=f"not recorded: {e}", message_id=mid)

    def reconcile_classes(self, mid: str = "") -> list[str]:
        """One step of every class (after a pass over the labs); returns the classes to retry."""
        if self.classes is None:
            return []
        records = self.classes.fetch_classes()
        labs = self.backend.fetch_labs() if records else []
        left = []
        for record in records:
            try:
                if not self.c.class_steps.reconcile_class(record, mid, labs):
                    left.append(f"class {record.name}")
            except TransientError as e:
                logs.emit("WARNING", action="reconcile-class", reason=f"retry later: {e}", message_id=mid,
                          **{"class": record.name})
                left.append(f"class {record.name}")
            except Exception as e:  # noqa: BLE001 -- one class's failure must not stop the other classes
                logs.emit("ERROR", action="reconcile-class", reason=f"{type(e).__name__}: {e}", message_id=mid,
                          traceback=traceback.format_exc(), **{"class": record.name})
        return left
