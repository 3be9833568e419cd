"""Worker processes end with their parent, even when it is SIGKILLed: no orphans decoding on."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (name) state ppid ...": the name may hold spaces, so split after ")".
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_and_check_workers(script: str, workers: int = 2) -> None:
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while len(started := children(parent.pid)) < workers:
            assert parent.poll() is None, "the parent ended before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        time.sleep(0.5)  # the workers are busy in their slow task
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(map(alive, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)], "workers outlived their killed parent"
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_ingest_leaves_no_worker_running(tmp_path):
    for index in range(80):  # more than the 64 files below which ingest checks in-process
        folder = tmp_path / "sem" / f"Class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), index, np.uint8)).save(folder / f"{index}.png")
    kill_and_check_workers(
        textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from sem_cls.data import ingest as ingest_module

            def slow(*args):
                time.sleep(60)

            ingest_module.check_image = slow
            ingest_module.ingest({str(tmp_path / "sem")!r}, workers=2, progress=False)
        """)
    )


def test_a_killed_training_leaves_no_data_loader_worker_running(tmp_path):
    kill_and_check_workers(
        textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from torch.utils.data import DataLoader, Dataset
            from sem_cls.data.workers import worker_init_fn

            class Slow(Dataset):
                def __len__(self):
                    return 8

                def __getitem__(self, index):
                    time.sleep(60)
                    return index

            loader = DataLoader(Slow(), num_workers=2, worker_init_fn=worker_init_fn)
            next(iter(loader))
        """)
    )


def test_data_loader_workers_are_seeded_as_lightning_seeds_them():
    """With seed_everything(workers=True) each worker draws what Lightning's own init gives."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.seed import pl_worker_init_function
    from torch.utils.data import DataLoader, Dataset

    from sem_cls.data.workers import worker_init_fn

    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(1).item(), float(np.random.rand())

    def draws(init):
        L.seed_everything(3, workers=True)
        loader = DataLoader(Draws(), num_workers=2, worker_init_fn=init)
        return [tuple(map(float, batch)) for batch in loader]

    ours = draws(worker_init_fn)
    assert ours == draws(pl_worker_init_function)
    assert ours != draws(None), "Lightning's seeding must not be lost"
