"""FitConfidence: the step of training that fits what a model's confidence needs beyond its
weights: the temperature (every validation epoch, so each checkpoint carries its own) and, for a
frozen backbone, the novelty references and threshold (once, at the start of fitting)."""

import logging

import torch
from lightning import Callback
from lightning.pytorch.trainer.states import TrainerFn

from sem_cls.data.samples import in_set_order
from sem_cls.models import novelty
from sem_cls.models.calibration import fit_temperature

log = logging.getLogger(__name__)


class FitConfidence(Callback):
    """Temperature from the validation logits (sem_cls.models.calibration); novelty references
    from the training split's features and the threshold flagging `novelty_val_share` of the
    validation split (sem_cls.models.novelty). All are buffers of the SEMModel, so checkpoints
    carry them; train.py adds this callback to every fit."""

    def __init__(self):
        self.outputs: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # A frozen backbone's features never change: the references and threshold fitted once
        # hold for every checkpoint of the run (and a resumed run fits the same again).
        model, share = pl_module.model, pl_module.novelty_val_share
        datamodule = trainer.datamodule
        if not share or datamodule is None:
            return
        if not model.frozen:
            log.warning(
                "No novelty detection for this model: its backbone learns, so its features "
                "move away from any reference taken now; predictions never say `unknown`."
            )
            return
        train, val = (self.split_features(pl_module, datamodule, s) for s in ("train", "val"))
        model.novelty_references = novelty.reference_features(train).to(pl_module.device)
        threshold = novelty.fit_threshold(
            novelty.novelty_scores(val, model.novelty_references), share
        )
        model.novelty_threshold.fill_(threshold)
        log.info(
            "Novelty: %d training images as references, threshold %.4f (%.0f%% of validation)",
            len(model.novelty_references), threshold, 100 * share,
        )  # fmt: skip

    @staticmethod
    @torch.no_grad()
    def split_features(pl_module, datamodule, split: str) -> torch.Tensor:
        """(N, num_features) frozen-backbone features of a split, unaugmented, in split order:
        the cached ones, or the backbone's (cache off, or augmented training images)."""
        device = pl_module.device
        features = []
        for batch in datamodule.unshuffled_loader(split):
            # As the Trainer hands a batch over: moved, then images normalised.
            batch = pl_module.on_after_batch_transfer(
                pl_module.transfer_batch_to_device(batch, device, 0), 0
            )
            features.append(pl_module.features(batch)[0].float())
        return torch.cat(features)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.outputs = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.outputs.append({k: outputs[k] for k in ("index", "target", "logits")})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # Before ModelCheckpoint saves this epoch (on_validation_end): it carries this T.
        # Every rank fits on the same gathered logits, so the ranks agree on T.
        validation = in_set_order(pl_module, self.outputs)
        temperature = fit_temperature(validation["logits"], validation["target"])
        pl_module.model.temperature.fill_(temperature)
        pl_module.log("val/temperature", temperature)
        self.outputs = []
