"""SEMClassifier: trains a SEMModel (a LightningModule that computes losses and logs them).

It builds no loader and reads nothing of the datamodule: batches say what they hold, and the
evaluation steps return their predictions, which sem_cls.evaluation.callback gathers and scores.
"""

import warnings

import timm.data
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from sem_cls.data.samples import normalised
from sem_cls.models import finetune
from sem_cls.models.model import SEMModel

# Lightning says so whenever a module with this hook meets a datamodule; it is by design here
# (the module knows its backbone's normalisation, the datamodule does not).
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`"
)

# Weight of InceptionV3's auxiliary loss, as in its paper and torchvision's recipe.
AUX_LOSS_WEIGHT = 0.4


class SEMClassifier(LightningModule):
    """Backbone features -> head -> class logits of `self.model`; cross-entropy, Adam by default.

    A frozen backbone (model.frozen) is a fixed feature extractor: no gradients, BatchNorm in
    inference mode, only the head learns. Otherwise the parameters in `learning_names` learn
    from epoch `unfreeze_after` on (sem_cls.models.finetune), optionally with layer-wise
    learning-rate decay and a warmup + cosine schedule. Batches are {"features": (B, F), ...}
    from the feature cache or {"image": (B, 3, H, W), ...}, each with "label" and "index".
    """

    def __init__(
        self,
        model: SEMModel,
        optimizer=None,
        learning_names=(),
        unfreeze_after: int = 0,
        layer_decay: float | None = None,
        warmup_epochs: int = 0,
        cosine_decay: bool = False,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        aux_head: nn.Module | None = None,
        mixup: dict | None = None,
        tta: bool = False,
        novelty_val_share: float | None = 0.05,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer  # rebuilt from config, never pickled in checkpoints
        self.learning_names = set(learning_names)
        self.unfreeze_after = unfreeze_after
        self.layer_decay = layer_decay
        self.warmup_epochs, self.cosine_decay = warmup_epochs, cosine_decay
        self.label_smoothing = label_smoothing
        # Share of validation images the novelty threshold flags (sem_cls.models.confidence).
        self.novelty_val_share = novelty_val_share
        # Test-time augmentation in evaluation passes (eval.py tta=true).
        self.tta = tta
        num_classes = len(model.class_names)
        weights = torch.ones(num_classes) if class_weights is None else class_weights
        # Training-loss weight per class (class_weighting=balanced); evaluation losses stay plain.
        self.register_buffer("class_weights", weights.float(), persistent=False)
        self.aux_head = aux_head  # InceptionV3's auxiliary classifier: training only
        self.mixup = timm.data.Mixup(**mixup, num_classes=num_classes) if mixup else None
        # Training batches only: evaluation passes are scored on gathered predictions.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def head_only(self) -> bool:
        """True while only the head learns: a frozen backbone, or the epochs before unfreezing."""
        return self.model.frozen or self.current_epoch < self.unfreeze_after

    def train(self, mode: bool = True):
        super().train(mode)
        if self.head_only():
            # Dropout and stochastic depth inside a frozen backbone stay off while the head trains.
            self.model.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # From unfreeze_after on, the scheduled stages learn; before, only the head. Set every
        # epoch from the epoch number, so a resumed run is in the right phase too.
        learning = not self.head_only()
        for name, parameter in self.model.backbone.named_parameters():
            if name in self.learning_names:
                parameter.requires_grad_(learning)
        self.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the model from the `model.*` weights (sem_cls.models.build).
        checkpoint["sem_model"] = self.model.spec

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The references' row count is the checkpoint's, not the empty buffer's.
        references = checkpoint["state_dict"]["model.novelty_references"]
        self.model.novelty_references = torch.empty_like(references)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # The eval transform's uint8 pixels are normalised as a batch, on the device.
        if isinstance(batch, dict) and "image" in batch:
            config = self.model.spec["data_config"]
            batch["image"] = normalised(batch["image"], config["mean"], config["std"])
        return batch

    def features(self, batch: dict):
        """(B, num_features) features of a batch, and InceptionV3's auxiliary features or None."""
        if "features" in batch:
            return batch["features"], None
        images = batch["image"].contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.model.frozen):
            features = self.model.backbone(images)  # (B, 3, H, W) -> (B, num_features)
        return features if isinstance(features, tuple) else (features, None)

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the class probabilities averaged over the 8 flips and 90-degree turns."""
        views = [torch.rot90(v, k, (-2, -1)) for v in (images, images.flip(-1)) for k in range(4)]
        return torch.stack([self(view).float().softmax(1) for view in views]).mean(0).log()

    def training_step(self, batch, batch_idx):
        targets = learned = batch["label"]
        # timm's Mixup pairs images within a batch, so it needs an even number of them.
        if "image" in batch and self.mixup is not None and len(targets) % 2 == 0:
            images, learned = self.mixup(batch["image"], targets)  # mixed images, soft targets
            batch = {**batch, "image": images}
        features, aux = self.features(batch)
        logits = self.model.head(features)
        # Weighting and smoothing shape what is learned (soft mixup targets are smooth already).
        smoothing = self.label_smoothing if learned is targets else 0.0
        loss = F.cross_entropy(
            logits, learned, weight=self.class_weights, label_smoothing=smoothing
        )
        if aux is not None and self.aux_head is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(self.aux_head(aux), learned)
        self.train_acc(logits, targets)
        log = {"on_step": False, "on_epoch": True, "prog_bar": True, "batch_size": len(targets)}
        # The epoch's mean over every rank's batches (the accuracy metric syncs itself).
        self.log("train/loss", loss, sync_dist=True, **log)
        self.log("train/acc", self.train_acc, **log)
        return loss

    def evaluation_step(self, batch: dict) -> dict:
        """A batch's predictions: sample indices, targets, (B, num_classes) logits and (B,)
        novelty scores (NaN without references, and under TTA, which has no single feature)."""
        targets = batch["label"]
        if self.tta and "image" in batch:
            logits, novelty = self.tta_logits(batch["image"]), None
        else:
            features = self.features(batch)[0]
            logits, novelty = self.model.head(features), self.model.novelty(features)
        if novelty is None:
            novelty = torch.full(targets.shape, float("nan"), device=targets.device)
        return {"index": batch["index"], "target": targets, "logits": logits.float(),
                "novelty": novelty.float()}  # fmt: skip

    def validation_step(self, batch, batch_idx):
        return self.evaluation_step(batch)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.evaluation_step(batch)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("SEMClassifier needs an optimizer factory to train.")
        # Every parameter the schedule will train goes in now; before unfreeze_after they get
        # no gradient, and optimizers leave parameters without one untouched.
        backbone = self.model.backbone
        for name, parameter in backbone.named_parameters():
            if name in self.learning_names:
                parameter.requires_grad_(True)
        settings = getattr(self.optimizer_factory, "keywords", {})
        heads = [p for m in (self.model.head, self.aux_head) if m for p in m.parameters()]
        groups = [{"params": heads}] + finetune.backbone_param_groups(
            backbone, settings.get("lr", 1e-3), settings.get("weight_decay", 0.0), self.layer_decay
        )
        optimizer = self.optimizer_factory(params=groups)
        if not (self.warmup_epochs or self.cosine_decay):
            return optimizer
        factor = finetune.warmup_cosine(
            self.warmup_epochs, self.cosine_decay, self.trainer.max_epochs
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
