"""Where the test time goes: Numba compilation against the rest, per test file and per kernel family.

Enabled by ``CKPTNORM_COMPILE_REPORT=FILE`` (``conftest.py`` registers it): Numba's ``numba:compile`` events
(fired for a real compilation, not for a load from the on-disk cache) are timed, and each outermost one -- a
kernel specialization, with the device functions it pulls in -- is charged to the test running at the time and to
its kernel family (module.function).  At the end the terminal shows the totals and FILE gets them as JSON.

Under pytest-xdist (the README's test command) every worker times its own compilations and hands them to the
controller with its results (``workeroutput``); the report then also shows the specializations compiled by more
than one worker: each worker compiles what it meets before the other has written it to Numba's disk cache.
Compilations in subprocesses (the process-group tests) are not seen: they count as the test's run time.
"""
from __future__ import annotations

import collections
import json
import time

import pytest
from numba.core import event

_OUTPUT_KEY = "ckptnorm_compile_events"


class _CompileTimer(event.Listener):
    """Records each outermost compilation as (family, signature, seconds, test)."""

    def __init__(self):
        self.depth = 0
        self.started = 0.0
        self.family = None  # the outermost compilation's kernel, module.function
        self.signature = None
        self.current_test = None
        self.events = []

    def on_start(self, ev):
        if self.depth == 0:
            self.started = time.perf_counter()
            fn = ev.data["dispatcher"].py_func
            self.family = f"{fn.__module__}.{fn.__qualname__}"
            self.signature = str(ev.data["args"])
        self.depth += 1

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            seconds = time.perf_counter() - self.started
            self.events.append((self.family, self.signature, seconds, self.current_test or ""))


class CompileReport:
    """The pytest plugin: test durations beside the compile time charged to them."""

    def __init__(self, path):
        self.path = path
        self.timer = _CompileTimer()
        self.durations = collections.Counter()
        self.events_by_process = {}  # "main" or the xdist worker id -> the timer's events
        event.register("numba:compile", self.timer)

    def pytest_runtest_logstart(self, nodeid, location):
        self.timer.current_test = nodeid

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session):
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller reports
            workeroutput[_OUTPUT_KEY] = self.timer.events
        elif self.timer.events:
            self.events_by_process["main"] = self.timer.events

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without pytest-xdist
    def pytest_testnodedown(self, node, error):
        self.events_by_process[node.gateway.id] = getattr(node, "workeroutput", {}).get(_OUTPUT_KEY, [])

    @staticmethod
    def _file(nodeid):
        return (nodeid or "(outside tests)").split("::")[0]

    def pytest_terminal_summary(self, terminalreporter):
        events = [e for process in self.events_by_process.values() for e in process]
        total, compiled = collections.Counter(), collections.Counter()
        by_family, count_by_family, by_test = collections.Counter(), collections.Counter(), collections.Counter()
        for nodeid, seconds in self.durations.items():
            total[self._file(nodeid)] += seconds
        for family, _, seconds, test in events:
            compiled[self._file(test)] += seconds
            by_family[family] += seconds
            count_by_family[family] += 1
            by_test[test] += seconds
        # a specialization compiled in several processes: every compilation but the cheapest was avoidable
        repeats = collections.defaultdict(list)
        for process, process_events in self.events_by_process.items():
            for family, signature, seconds, _ in process_events:
                repeats[(family, signature)].append(seconds)
        repeated = {key: times for key, times in repeats.items() if len(times) > 1}
        repeated_seconds = sum(sum(times) - min(times) for times in repeated.values())

        files = sorted(set(total) | set(compiled), key=lambda f: -total[f])
        write = terminalreporter.write_line
        terminalreporter.section("Numba compile time (CKPTNORM_COMPILE_REPORT)")
        write(f"{'file':44s} {'total s':>9s} {'compile s':>10s} {'share':>6s}")
        for f in files:
            share = compiled[f] / total[f] if total[f] else 0.0
            write(f"{f:44s} {total[f]:9.1f} {compiled[f]:10.1f} {share:6.0%}")
        write(f"{'all':44s} {sum(total.values()):9.1f} {sum(compiled.values()):10.1f}")
        write("")
        write(f"{'kernel family':60s} {'compiles':>8s} {'seconds':>8s}")
        for family, seconds in by_family.most_common():
            write(f"{family:60s} {count_by_family[family]:8d} {seconds:8.1f}")
        write("")
        write(f"{len(repeats)} specializations compiled in {len(self.events_by_process)} process(es); "
              f"{len(repeated)} of them in more than one, {repeated_seconds:.1f} s of repeated compilation")
        with open(self.path, "w") as fh:
            json.dump({"test_seconds_by_file": total, "compile_seconds_by_file": compiled,
                       "compile_seconds_by_family": by_family, "compiles_by_family": count_by_family,
                       "compile_seconds_by_test": by_test,
                       "repeated_compilations": [{"family": f, "signature": s, "seconds": t}
                                                 for (f, s), t in sorted(repeated.items())],
                       "compilations": self.events_by_process}, fh, indent=1)
