"""EvaluationReports: write and log reports for the best validation epoch and for each test pass."""

import logging
from pathlib import Path

from lightning import Callback
from lightning.pytorch.trainer.states import TrainerFn

from sem_cls.evaluation.reports import write_reports
from sem_cls.tracking import log_artifacts

log = logging.getLogger(__name__)


class EvaluationReports(Callback):
    """Confusion matrix and classification report for `val` (at the best epoch) and `test`.

    The best epoch is judged as ModelCheckpoint judges it (`monitor`, higher is better), so the
    validation report belongs to the checkpoint that is kept. Keeping its predictions spares a
    second pass over the validation set.
    """

    def __init__(self, output_dir: str, monitor: str = "val/acc"):
        self.output_dir = Path(output_dir)
        self.monitor = monitor
        self.best_score = None
        self.best_predictions = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score = score.item()
            self.best_predictions = pl_module.predictions()

    def state_dict(self) -> dict:
        # In checkpoints: a resumed run still writes the report of the best epoch before a kill.
        return {"best_score": self.best_score, "best_predictions": self.best_predictions}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state["best_score"]
        self.best_predictions = state["best_predictions"]

    def on_fit_end(self, trainer, pl_module):
        if self.best_predictions is not None and trainer.is_global_zero:
            self._write(trainer, pl_module, "val", *self.best_predictions)

    def on_test_end(self, trainer, pl_module):
        targets, preds = pl_module.predictions()
        if trainer.is_global_zero:
            self._write(trainer, pl_module, pl_module.test_split, targets, preds)

    def _write(self, trainer, pl_module, split, targets, preds):
        out_dir = self.output_dir / split
        paths = write_reports(
            out_dir,
            targets.cpu().numpy(),
            preds.cpu().numpy(),
            pl_module.class_names,
            f"{split}: {len(targets)} images, accuracy {(targets == preds).float().mean():.3f}",
        )
        log.info("%s reports in %s", split, out_dir)
        log_artifacts(trainer.loggers, paths, f"reports/{split}")
