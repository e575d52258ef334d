"""Inside the operator: ``connector-credentials`` with a memory probe (a debug run; bench/memory_breakdown.py
starts it). Not for production: it walks the heap on a signal.

    python bench/memprobe.py run -n NS        # the console script's arguments

Environment:

* ``CCRED_PROBE_OUT``: a directory; each ``SIGUSR1`` writes ``report-K.json`` there (K = 1, 2, ...).
* ``CCRED_PROBE_TRACEMALLOC=N``: trace Python allocations with N frames (0, the default: off). A thread
  then takes a snapshot whenever the traced memory grows 5 % past its previous maximum, so the last one
  is taken near the peak; its statistics by file and by line go into every report.

A report holds, never a value (sizes, counts and type names only):

* ``/proc/self/status`` (VmRSS, VmHWM, RssAnon) and glibc's ``mallinfo2`` (what malloc holds, in use
  and free), before and after ``malloc_trim(0)`` when ``trim`` is asked (``SIGUSR2`` instead of ``SIGUSR1``);
* the engine's entries sized part by part (``deep_size``: ``sys.getsizeof`` over ``gc.get_referents``,
  each object counted once, stopping at types, modules, functions, the loop and the engine's shared
  objects), kopf's per-object memories, the redaction index, and the asyncio tasks by coroutine;
* the most numerous types of the gc's objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import ctypes.util
import dataclasses
import gc
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
import tracemalloc
import types
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("CCRED_PROBE_OUT", "/tmp"))
FRAMES = int(os.environ.get("CCRED_PROBE_TRACEMALLOC", "0") or 0)
GROWTH = 1.02

_STOP_TYPES: tuple[type, ...] = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.MethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    types.MappingProxyType,
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


LIBC = _libc()


def mallinfo() -> dict[str, float]:
    """glibc's view in MiB: heap obtained by brk/arenas, mmapped blocks, in use, free inside the heap."""
    if LIBC is None or not hasattr(LIBC, "mallinfo2"):
        return {}
    LIBC.mallinfo2.restype = _MallInfo2
    info = LIBC.mallinfo2()
    mib = 1024 * 1024
    return {
        "arena": info.arena / mib,
        "mmapped": info.hblkhd / mib,
        "in_use": info.uordblks / mib,
        "free": info.fordblks / mib,
    }


def proc_status() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    found = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
        match = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
        if match:
            found[key] = int(match.group(1)) / (1 if key == "Threads" else 1024)
    return found


def deep_size(obj: Any, seen: set[int], stop: set[int]) -> int:
    """Bytes of ``obj`` and everything it reaches that ``seen`` has not counted yet (``seen`` grows)."""
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        key = id(item)
        if key in seen or key in stop:
            continue
        seen.add(key)
        if isinstance(item, _STOP_TYPES):
            continue
        try:
            total += sys.getsizeof(item)
        except TypeError:
            continue
        stack.extend(gc.get_referents(item))
    return total


def _objects_of(type_name: str, module_prefix: str) -> list[Any]:
    return [
        obj
        for obj in gc.get_objects()
        if type(obj).__name__ == type_name and type(obj).__module__.startswith(module_prefix)
    ]


def _shared(loop: asyncio.AbstractEventLoop | None) -> set[int]:
    """What per-object parts point at but do not own: counted nowhere."""
    stop: set[int] = set()
    for name, prefix in (
        ("Engine", "connector_credentials"),
        ("StatusWriter", "connector_credentials"),
        ("Reads", "connector_credentials"),
        ("Timing", "connector_credentials"),
        ("OperatorSettings", "connector_credentials"),
        ("OperatorSettings", "kopf"),
        ("ConnectorCredentialSpec", "__never__"),
    ):
        stop.update(id(obj) for obj in _objects_of(name, prefix))
    if loop is not None:
        stop.add(id(loop))
    stop.update(id(m) for m in sys.modules.values())
    return stop


def _fields(obj: Any) -> list[Any]:
    return [getattr(obj, field.name) for field in dataclasses.fields(obj)]


def entry_breakdown(loop: asyncio.AbstractEventLoop | None) -> dict[str, Any]:
    engines = _objects_of("Engine", "connector_credentials.core.engine")
    if not engines:
        return {}
    engine = engines[0]
    entries = list(engine._entries.values())
    stop = _shared(loop)
    seen: set[int] = set()
    parts: Counter[str] = Counter()

    def add(name: str, obj: Any) -> None:
        parts[name] += deep_size(obj, seen, stop)

    shells: list[Any] = []
    for entry in entries:
        shells += (entry, entry.api, entry.held, entry.schedule, entry.reporting)
    stop |= {id(shell) for shell in shells}
    for shell in shells:  # the objects themselves and their attribute dicts (none with slots)
        attributes = getattr(shell, "__dict__", None)
        parts["entry objects (Entry and its 4 parts)"] += sys.getsizeof(shell) + (
            sys.getsizeof(attributes) if attributes is not None else 0
        )
        if attributes is not None:
            seen.add(id(attributes))
    for entry in entries:
        api, held, schedule, reporting = entry.api, entry.held, entry.schedule, entry.reporting
        add("entry small fields (names, uid, versions, times)", (entry.namespace, entry.name))
        add("api.live_status", api.live_status)
        add("api.raw_spec", api.raw_spec)
        add("api.spec (parsed)", api.spec)
        add("api.spec_error", api.spec_error)
        add("held.body", held.body)
        add("held.value", held.value)
        for value in _fields(api):
            add("entry small fields (names, uid, versions, times)", value)
        for value in _fields(held):
            add("entry small fields (names, uid, versions, times)", value)
        add("schedule.outcome", schedule.outcome)
        for value in _fields(schedule):
            add("entry small fields (names, uid, versions, times)", value)
        # Older forms, for a variant measured against this one: a flush task and its wake event each.
        add("reporting.task (flush task, what it awaits)", getattr(reporting, "task", None))
        add("reporting.wake (asyncio.Event)", getattr(reporting, "wake", None))
        add("reporting.pending_status", reporting.pending_status)
        add("reporting.pending_events", reporting.pending_events)
        add(
            "reporting.waiter and paces",
            [getattr(reporting, name, None) for name in ("waiter", "status_pace", "event_pace")],
        )
        for value in _fields(reporting):
            add("entry small fields (names, uid, versions, times)", value)
    key_dict = sys.getsizeof(engine._entries) + sum(sys.getsizeof(k) for k in engine._entries)
    parts["engine registry dict and keys"] += key_dict
    queue = getattr(engine._writer, "_queue", None)
    if queue is not None:  # the credentials waiting for a write: queue entries and retry deadlines
        parts["status writer's queues and retry heap"] += deep_size([queue._queues, queue._retries], seen, stop)
    redaction = deep_size(engine.redaction, seen, stop)
    reads = engine.reads
    # Not its port and thread pools (their threads and queues are not per credential).
    apart = {id(getattr(reads, name, None)) for name in ("_port", "_executor", "_priority_executor")}
    reader = deep_size(reads, seen, (stop - {id(reads)}) | apart)
    return {
        "entries": len(entries),
        "parts": dict(parts),
        "redaction_index": redaction,
        "reader": reader,
    }


def kopf_breakdown(loop: asyncio.AbstractEventLoop | None) -> dict[str, Any]:
    stop = _shared(loop)
    found: dict[str, Any] = {}
    memories = _objects_of("ResourceMemories", "kopf")
    if memories:
        items = memories[0]._items
        seen: set[int] = set()
        found["memories"] = len(items)
        found["memories_bytes"] = deep_size(items, seen, stop)
        sample = next(iter(items.values()), None)
        if sample is not None:
            one: Counter[str] = Counter()
            s1: set[int] = set()
            for field in ("memo", "error_throttler", "indexing_memory", "daemons_memory"):
                one[field] = deep_size(getattr(sample, field), s1, stop)
            one["ResourceMemory itself"] = deep_size(sample, s1, stop)
            found["one_memory"] = dict(one)
    return found


def tasks_breakdown(loop: asyncio.AbstractEventLoop | None) -> dict[str, Any]:
    """Tasks by coroutine: how many, their bytes (the task, its coroutine and frame, what the frame
    reaches that nothing counted before), and apart from that the contexts they run in: a task copies
    the context it was created in, and a kopf handler's context holds kopf's ``cause_var`` (the body)."""
    if loop is None:
        return {}
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError:
        return {}
    stop = _shared(loop)
    seen: set[int] = set()
    ctx_seen: set[int] = set()
    by_kind: Counter[str] = Counter()
    size_by_kind: Counter[str] = Counter()
    ctx_by_kind: Counter[str] = Counter()
    vars_by_kind: dict[str, Counter[str]] = {}
    for task in tasks:
        coro = task.get_coro()
        kind = getattr(coro, "__qualname__", type(coro).__name__)
        by_kind[kind] += 1
        contexts = [ref for ref in gc.get_referents(task) if isinstance(ref, contextvars.Context)]
        for context in contexts:
            names = vars_by_kind.setdefault(kind, Counter())
            for var in context:
                names[var.name] += 1
            ctx_by_kind[kind] += deep_size(context, ctx_seen, stop | {id(task)})
        size_by_kind[kind] += deep_size(task, seen, stop | {id(c) for c in contexts})
    return {
        kind: {
            "count": count,
            "bytes": size_by_kind[kind],
            "context_bytes": ctx_by_kind[kind],
            "context_vars": dict(vars_by_kind.get(kind, {})),
        }
        for kind, count in by_kind.most_common(15)
    }


def census(top: int = 25) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter(f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in gc.get_objects())
    return counts.most_common(top)


# --- tracemalloc near the peak ----------------------------------------------------------------------------


_peak: dict[str, Any] = {}


def _stats(snapshot: tracemalloc.Snapshot, key: str, top: int) -> list[tuple[str, float, int]]:
    rows = []
    for stat in snapshot.statistics(key)[:top]:
        frame = stat.traceback[0]
        where = _short(frame.filename) + (f":{frame.lineno}" if key == "lineno" else "")
        rows.append((where, stat.size / 1024 / 1024, stat.count))
    return rows


def _traces(snapshot: tracemalloc.Snapshot, top: int) -> list[tuple[str, float, int]]:
    rows = []
    for stat in snapshot.statistics("traceback")[:top]:
        where = " < ".join(f"{_short(frame.filename)}:{frame.lineno}" for frame in stat.traceback)
        rows.append((where, stat.size / 1024 / 1024, stat.count))
    return rows


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3", "operator/"):
        at = filename.find(marker)
        if at >= 0:
            return filename[at + len(marker) :]
    return filename


def _sampler() -> None:
    best = 0
    while True:
        time.sleep(0.1)
        current, _ = tracemalloc.get_traced_memory()
        if current > best * GROWTH:
            best = current
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
            )
            _peak.update(
                traced_mib=current / 1024 / 1024,
                at=time.monotonic(),
                by_file=_stats(snapshot, "filename", 40),
                by_line=_stats(snapshot, "lineno", 60),
                by_trace=_traces(snapshot, 25),
                status=proc_status(),
            )
            del snapshot


# --- the signal --------------------------------------------------------------------------------------------


_counter = itertools.count(1)
_last = [0]


def _report(trim: bool) -> None:
    number = _last[0] = next(_counter)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    report: dict[str, Any] = {"at": time.monotonic(), "status": proc_status(), "mallinfo": mallinfo()}
    for name, fn in (("engine", entry_breakdown), ("kopf", kopf_breakdown), ("tasks", tasks_breakdown)):
        for _ in range(3):  # other threads may change a dict while it is walked
            try:
                report[name] = fn(loop)
                break
            except RuntimeError as exc:
                report[name] = {"error": str(exc)}
    report["census"] = census()
    report["gc_objects"] = len(gc.get_objects())
    report["pymalloc_blocks"] = sys.getallocatedblocks()
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        report["tracemalloc"] = {"current_mib": current / 2**20, "peak_mib": peak / 2**20, "near_peak": dict(_peak)}
        snapshot = tracemalloc.take_snapshot()
        report["tracemalloc"]["now_by_file"] = _stats(snapshot, "filename", 40)
        report["tracemalloc"]["now_by_line"] = _stats(snapshot, "lineno", 60)
        del snapshot
    if trim and LIBC is not None:
        gc.collect()
        report["after_gc"] = {"status": proc_status(), "mallinfo": mallinfo()}
        LIBC.malloc_trim(0)
        report["after_trim"] = {"status": proc_status(), "mallinfo": mallinfo()}
    path = OUT / f"report-{number}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.rename(path)


def _on_signal(signum: int, frame: Any) -> None:
    try:
        _report(trim=signum == signal.SIGUSR2)
    except Exception as exc:  # a probe must not kill the operator
        (OUT / f"report-{_last[0]}.json").write_text(json.dumps({"error": repr(exc)}))


# --- experiments: what a change would save, measured without changing the package ----------------------

#: ``CCRED_PROBE_KOPF="watching.chunk_size=250;queueing.idle_timeout=0.1"``: kopf settings set after ours.
KOPF = os.environ.get("CCRED_PROBE_KOPF", "")
#: ``CCRED_PROBE_EXPERIMENTS="name,name"``: functions of EXPERIMENTS applied before the operator starts.
EXPERIMENTS_ASKED = [name for name in os.environ.get("CCRED_PROBE_EXPERIMENTS", "").split(",") if name]


def _kopf_settings() -> None:
    import kopf

    from connector_credentials.adapters.kube import handlers

    register = handlers.register
    assignments = [item.split("=", 1) for item in KOPF.split(";") if item]

    def probed(registry: Any, engine: Any) -> None:
        register(registry, engine)

        @kopf.on.startup(registry=registry, id="zz-probe-settings")
        def configure(settings: Any, **_: Any) -> None:
            for path, raw in assignments:
                *parents, leaf = path.split(".")
                target = settings
                for part in parents:
                    target = getattr(target, part)
                setattr(target, leaf, json.loads(raw))

    handlers.register = probed  # type: ignore[assignment]


EXPERIMENTS: dict[str, Any] = {}


def main(argv: Iterable[str]) -> None:
    if FRAMES:
        tracemalloc.start(FRAMES)
        threading.Thread(target=_sampler, name="memprobe", daemon=True).start()
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGUSR2, _on_signal)
    if KOPF:
        _kopf_settings()
    for name in EXPERIMENTS_ASKED:
        EXPERIMENTS[name]()
    from connector_credentials.cli.main import main as cli

    with contextlib.suppress(SystemExit):
        cli(args=list(argv), prog_name="connector-credentials")


if __name__ == "__main__":
    main(sys.argv[1:])
