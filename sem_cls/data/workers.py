"""Worker processes (ingest's pool, DataLoader workers) that end when the process that started
them ends, even when it is killed (SIGKILL runs no cleanup code, so the kernel must do it)."""

import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SIGKILL = 9


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent ends; exit now if it already has.

    Elsewhere (macOS, Windows) this does nothing: there the pool's own shutdown is all there is.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    # The parent may have died between the fork and the prctl: then nobody sends the signal.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: die with the parent, then seed as Lightning would.

    Lightning adds its own worker seeding (`pl_worker_init_function`) only to loaders without a
    `worker_init_fn`, so it is called here when `seed_everything(workers=True)` asked for it.
    """
    die_with_parent()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
