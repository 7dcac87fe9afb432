"""Threads and CPU shares: how many cores this process may use, and how to split them.

Torch, OpenMP (faiss) and MKL each size their pools to every core of the machine by
default. Two such processes on one small machine (the app serving searches while a
build trains in the background, or two builds) then run twice as many busy threads as
cores, and spinning OpenMP workers make both many times slower than either alone. So:

- `usable_cores()`: the cores this process may run on (its affinity mask, which cgroups
  and ``taskset`` narrow), not the machine's count;
- `set_threads(n)`: torch's intra-op pool, faiss's OpenMP pool and the environment that
  child processes inherit (``OMP_NUM_THREADS`` ...), set together;
- `background(n)`: for a build process: its thread count and a lower scheduling priority
  (``nice``), so that the searches of the page running beside it come first.

DataLoader workers set their own torch threads to 1 (PyTorch does that in each worker).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
BACKGROUND_NICE = 10  # CFS weight 110 against 1024: the page's searches get ~90% of a shared core


def usable_cores() -> int:
    """Cores this process may run on (sched_getaffinity where the OS has it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def set_threads(n: int, children: bool = True) -> int:
    """Use `n` threads for torch and faiss in this process (and, with `children`, in the
    processes it starts). Returns n. Safe to call before torch or faiss is imported: the
    environment variables then size their pools when they load."""
    n = max(1, int(n))
    if children:
        for var in THREAD_ENV:
            os.environ[var] = str(n)
    import sys

    if "torch" in sys.modules or children:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    if "faiss" in sys.modules:
        try:
            sys.modules["faiss"].omp_set_num_threads(n)
        except AttributeError:  # pragma: no cover - a faiss build without OpenMP
            pass
    return n


def background(threads: int | None = None, nice: int = BACKGROUND_NICE) -> int:
    """Make this process a polite background build: `threads` threads (default: every usable
    core: a lone build should use the machine) at a lower priority. Returns the threads."""
    n = set_threads(threads or usable_cores())
    try:
        os.nice(nice)
    except (AttributeError, OSError) as e:  # pragma: no cover - not permitted / not POSIX
        log.debug("cannot lower the priority: %s", e)
    return n


def resolve_device(name: str = "auto"):
    """A torch.device from a --device flag: "auto" is the GPU when there is one, else the CPU."""
    import torch  # deferred: this module is imported before torch by the app and the builder

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
