"""Process-wide memory settings, applied once at start, before any thread exists."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

#: glibc's mallopt() parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
#: Arenas for the whole process: the event loop and the AWS threads share them.
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (``MALLOC_ARENA_MAX``) unless the environment already chose.

    glibc gives each thread that allocates its own arena, up to 8 per core, and memory freed in
    one arena serves only that arena: the AWS worker threads, which parse responses, would each
    keep a few MiB of their own. With two arenas the resident set stays close to what Python
    holds. No effect (False) on another libc, or when MALLOC_ARENA_MAX is set.
    """
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
