"""The scheduler's time slice of a process (Linux 6.12 and later, EEVDF): read and set.

On EEVDF a task that is woken takes the core from the one running there only if its
slice is shorter (``PREEMPT_SHORT``); with equal slices the running task keeps the core
until it sleeps, its slice is used up or the next tick comes (``RUN_TO_PARITY``).  A
normal task's slice is the kernel's base slice (1.4 ms on this 2-core VM); a task can ask
for another, 0.1-100 ms, with ``sched_setattr``'s ``sched_runtime``, which Python's
``os`` module does not offer.  ``benchmarks.ttft --slice`` uses it to show who waits
behind whom in the time to first token, and ``benchmarks.run`` to give its load
generator, which stands in for clients on other machines, a core when it wakes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

__all__ = ["get_slice_ns", "set_process_slice_ns", "set_slice_ns"]

_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
"""(sched_setattr, sched_getattr) by machine."""
_ATTR = struct.Struct("IIQiIQQQII")
"""struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period,
util_min, util_max (SCHED_OTHER is policy 0)."""


def _syscall(index: int, *args: object) -> None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"sched_setattr: no syscall number for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[index], *args) != 0:
        errno = ctypes.get_errno()
        name = "sched_setattr" if index == 0 else "sched_getattr"
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def get_slice_ns(tid: int = 0) -> int:
    """The slice of thread ``tid`` (0: the calling one), in ns; 0 where there is none."""
    buf = ctypes.create_string_buffer(_ATTR.size)
    _syscall(1, tid, buf, _ATTR.size, 0)
    return int(_ATTR.unpack(buf.raw)[5])


def set_slice_ns(tid: int, ns: int) -> None:
    """Give thread ``tid`` (0: the calling one) a slice of ``ns`` (0: the kernel's own),
    as a normal task, nice 0; raises OSError where the kernel does not keep it (before
    6.12)."""
    buf = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, 0, 0, 0, 0, ns, 0, 0, 0, 0))
    _syscall(0, tid, buf, 0)
    if ns and get_slice_ns(tid) != ns:
        raise OSError(f"this kernel does not keep a task's own slice ({platform.release()})")


def set_process_slice_ns(pid: int, ns: int) -> None:
    """Every thread of process ``pid``; threads started later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        set_slice_ns(int(task.name), ns)
