"""How a training run ends when it cannot finish: stopped by SIGTERM (a cluster's time limit,
`kill`) or SIGINT (Ctrl+C), or failed. The exit code says so (143, 130, non-zero), the MLflow run
is ended KILLED or FAILED, an epoch under way is kept in last.ckpt, and one message says how to
continue: `python train.py resume=<folder>`.

Inside Lightning's loops the stop is Lightning's own: its SIGTERM handler sets a flag, and the
loop raises SIGTERMException at the end of the batch (SIGINT is passed to that handler too, so
Ctrl+C never stops a run halfway through an optimizer step). Outside them (ingest, feature
extraction, registration) there is no batch to finish, and the signal stops the run at once.
"""

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from lightning import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sem_cls.errors import OutOfSpace, is_out_of_space
from sem_cls.resume import RUN_ID_FILE, last_checkpoint
from sem_cls.tracking import end_run, run_status

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived outside Lightning's loops. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way mistakes it for an error to handle."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT handlers for the life of a run; `signum` is the first one received."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._forwarding = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python sets handlers in the main thread only (a launcher's thread pool)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self._forwarding:  # called back by Lightning's handler, which this one called
            return
        repeated = self.signum is not None
        self.signum = self.signum or signum
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if lightning_handler == self._handle or (repeated and signum == signal.SIGINT):
            raise Stopped(self.signum)  # no Trainer loop to finish, or a second Ctrl+C
        # A Trainer runs its loops: Lightning's handler holds SIGTERM and calls this one too;
        # SIGINT is handed to it, and the loop stops at the end of the batch.
        if signum != signal.SIGTERM and callable(lightning_handler):
            self._forwarding = True
            try:
                lightning_handler(signum, frame)
            finally:
                self._forwarding = False

    def raise_if_received(self) -> None:
        """Stop now if a signal arrived while Lightning was finishing its loop (it then returns
        normally, leaving the stop to its caller)."""
        if self.signum is not None:
            raise Stopped(self.signum)


_active: StopSignals | None = None


def stop_if_signalled() -> None:
    """Stop the run here if a stop signal has arrived; for train.py between its stages."""
    if _active is not None:
        _active.raise_if_received()


class CheckpointOnStop(Callback):
    """Saves last.ckpt when a stop signal ends an epoch under way, beside ModelCheckpoint's: the
    resumed run continues that epoch instead of repeating it (with a long epoch and a short
    time limit, a run that always started its epoch over would never end)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        stopped = isinstance(exception, SIGTERMException | Stopped)
        checkpoint = trainer.checkpoint_callback
        # An epoch has started and not completed; not in setup (feature extraction), where the
        # progress is not yet restored and a checkpoint would replace the one resumed from.
        epochs = trainer.fit_loop.epoch_progress.current
        in_epoch = trainer.state.fn == TrainerFn.FITTING and epochs.started > epochs.completed
        if stopped and in_epoch and checkpoint is not None and checkpoint.dirpath:
            path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
            trainer.save_checkpoint(path)
            log.info("Stopped during epoch %d: saved %s", trainer.current_epoch, path)


def out_of_space(err: BaseException, cfg: DictConfig) -> OutOfSpace | None:
    """The disk-space error behind `err` (an OSError with ENOSPC, or SQLite's "database or disk
    is full" from the MLflow store), named by its path and the option that moves it; None when
    `err` is not for want of space."""
    paths = {  # most specific first: the MLflow store and the cache may lie in the log folder
        "paths.mlruns_dir": OmegaConf.select(cfg, "paths.mlruns_dir"),
        "paths.cache_dir": OmegaConf.select(cfg, "paths.cache_dir"),
        "paths.log_dir": OmegaConf.select(cfg, "paths.log_dir"),
    }

    def option_for(path: Path) -> str:
        for option, folder in paths.items():
            if folder and Path(path).resolve().is_relative_to(Path(folder).resolve()):
                return option
        return "paths.log_dir"

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if is_out_of_space(err) and (err.filename2 or err.filename):
            # shutil.copy names its source as filename and its target as filename2
            target = Path(err.filename2 or err.filename)
            source = Path(err.filename) if err.filename2 else None
            needed = source.stat().st_size if source is not None and source.is_file() else None
            return OutOfSpace(target, needed, option_for(target))
        if "database or disk is full" in str(err):
            store = paths["paths.mlruns_dir"] or "the MLflow store"
            return OutOfSpace(Path(store), None, "paths.mlruns_dir")
        err = err.__cause__ or err.__context__
    return None


def _run_id(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


@contextmanager
def ends_recorded(cfg: DictConfig):
    """Around a training run: a stop signal ends it with exit code 128 + signal (143 for
    SIGTERM, 130 for SIGINT), its MLflow run KILLED and a message naming `resume=<folder>`; any
    other error ends its MLflow run FAILED (it would otherwise show RUNNING for good)."""
    global _active
    signals = StopSignals()
    signals.install()
    _active = signals
    output_dir = Path(cfg.paths.output_dir)
    uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri")
    run_id = _run_id(output_dir)  # a resumed run's
    status_before = run_status(uri, run_id) if uri and run_id else None
    try:
        yield signals
    except (Stopped, SIGTERMException, KeyboardInterrupt) as stop:
        signum = signals.signum or getattr(stop, "signum", None) or signal.SIGTERM
        name = signal.Signals(signum).name
        if rank_zero_only.rank == 0:
            if uri and _run_id(output_dir):
                end_run(uri, _run_id(output_dir), "KILLED", status_before)
            checkpoint = last_checkpoint(output_dir)
            where = f"last checkpoint: {checkpoint}" if checkpoint else "no checkpoint was saved"
            message = (
                f"Stopped by {name} ({where}). Continue the run with: "
                f"python train.py resume={output_dir}"
            )
            log.warning(message)
            print(f"\n{message}", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except BaseException as err:
        failed = not isinstance(err, SystemExit) or err.code not in (0, None)
        if failed and rank_zero_only.rank == 0 and uri and _run_id(output_dir):
            end_run(uri, _run_id(output_dir), "FAILED")
        full = None if isinstance(err, OutOfSpace) else out_of_space(err, cfg)
        if full is not None:
            raise full from None
        raise
    finally:
        signals.restore()
        _active = None
