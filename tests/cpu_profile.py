"""Where the suite's CPU goes: a pytest plugin that adds up each module's CPU seconds, its own and its children's.

    PYTHONPATH=tests python -m pytest -p cpu_profile -n auto --dist loadfile     # from the repository root

The suite is CPU-bound on 2 cores, so its wall time is about its CPU seconds over the cores, and the modules that
cost most are the ones to make cheaper. Each test's CPU is this process's, plus its waited-for children's
(bentoml serve once stopped, torchrun, chromium's driver), plus the runs forked from tests/zygote.py, which
report their own, and those a stand-in asked for (torchrun's workers, bentoml's, a benchmark's children), which the
zygote adds up in a file. A module's shared fixtures count in the test that first asks for them. At the end each
process prints its modules, most CPU first, and the wall-clock span it ran them in; its 15 costliest tests; its ten
costliest forked runs; and every run that could not be forked (and so paid a fresh interpreter's imports), with the
reason.
"""

import resource
import sys
import time
from collections import defaultdict

import pytest

_cpu: dict[str, float] = defaultdict(float)
_tests: dict[str, float] = {}
_span: dict[str, list[float]] = {}


def _cpu_now() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    zygote = sys.modules.get("zygote")
    forked = zygote._zygote.cpu_s if zygote is not None and zygote._zygote is not None else 0.0
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + forked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start_cpu, start = _cpu_now(), time.monotonic()
    yield
    module = item.nodeid.split("::")[0]
    _tests[item.nodeid] = _cpu_now() - start_cpu
    _cpu[module] += _tests[item.nodeid]
    _span.setdefault(module, [start, start])[1] = time.monotonic()


def pytest_unconfigure(config):
    if not _cpu:
        return
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    first = min(s for s, _ in _span.values())
    lines = [f"cpu_profile {worker}: {sum(_cpu.values()):.0f} s of CPU in {len(_cpu)} modules"]
    for module, seconds in sorted(_cpu.items(), key=lambda kv: -kv[1]):
        start, end = _span[module]
        lines.append(f"  {seconds:7.1f} s CPU  {start - first:6.0f}-{end - first:.0f} s  {module}")
    lines.append("  the costliest tests (with the shared fixtures they were first to ask for):")
    costliest = sorted(_tests.items(), key=lambda kv: -kv[1])[:15]
    lines += [f"  {seconds:7.1f} s CPU  {test[:150]}" for test, seconds in costliest]
    zygote = sys.modules.get("zygote")
    if zygote is not None and zygote._zygote is not None:
        lines.append("  the costliest runs forked from the zygote:")
        costliest = sorted(zygote._zygote.runs)[:-11:-1]
        lines += [f"  {seconds:7.1f} s CPU  {command[:150]}" for seconds, command in costliest]
    if zygote is not None and zygote.fallbacks:  # each one pays a fresh interpreter's imports
        lines.append(f"  {len(zygote.fallbacks)} runs not forked (the variables that differ from the zygote's):")
        lines += [f"    {command[:120]}  {why}" for command, why in zygote.fallbacks]
    # A worker's stdout is not shown by xdist; stderr reaches the terminal.
    print("\n".join(lines), file=sys.stderr, flush=True)
