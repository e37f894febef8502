"""Where the test time goes: Numba compilation against the rest, per test file and per kernel family.

Enabled by ``CKPTNORM_COMPILE_REPORT=FILE`` (``conftest.py`` registers it): Numba's ``numba:compile`` events
(fired for a real compilation, not for a load from the on-disk cache) are timed, and each outermost one -- a
kernel, with the device functions it pulls in -- is charged to the test running at the time and to its kernel
family (module.function).  At the end the terminal shows the totals and FILE gets them as JSON.  Compilations in
subprocesses (the process-group tests) are not seen: they count as the test's run time.
"""
from __future__ import annotations

import collections
import json
import time

from numba.core import event

class _CompileTimer(event.Listener):
    def __init__(self):
        self.depth = 0
        self.started = 0.0
        self.family = None  # the outermost compilation's kernel, module.function
        self.current_test = None
        self.by_test = collections.Counter()
        self.by_family = collections.Counter()
        self.count_by_family = collections.Counter()

    def on_start(self, ev):
        if self.depth == 0:
            self.started = time.perf_counter()
            fn = ev.data["dispatcher"].py_func
            self.family = f"{fn.__module__}.{fn.__qualname__}"
        self.depth += 1

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            seconds = time.perf_counter() - self.started
            self.by_test[self.current_test] += seconds
            self.by_family[self.family] += seconds
            self.count_by_family[self.family] += 1


class CompileReport:
    """The pytest plugin: test durations beside the compile time charged to them."""

    def __init__(self, path):
        self.path = path
        self.timer = _CompileTimer()
        self.durations = collections.Counter()
        event.register("numba:compile", self.timer)

    def pytest_runtest_logstart(self, nodeid, location):
        self.timer.current_test = nodeid

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] += report.duration

    def _by_file(self, counter):
        out = collections.Counter()
        for nodeid, value in counter.items():
            out[(nodeid or "(outside tests)").split("::")[0]] += value
        return out

    def pytest_terminal_summary(self, terminalreporter):
        total, compiled = self._by_file(self.durations), self._by_file(self.timer.by_test)
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
        for family, seconds in self.timer.by_family.most_common():
            write(f"{family:60s} {self.timer.count_by_family[family]:8d} {seconds:8.1f}")
        with open(self.path, "w") as fh:
            json.dump({"test_seconds_by_file": total, "compile_seconds_by_file": compiled,
                       "compile_seconds_by_family": self.timer.by_family,
                       "compiles_by_family": self.timer.count_by_family,
                       "compile_seconds_by_test": {k or "": v for k, v in self.timer.by_test.items()}}, fh, indent=1)
