"""SEMClassifier: a timm backbone, frozen by default, with a new head (a LightningModule)."""

import logging

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from timm.data import resolve_model_data_config
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from sem_cls.data.metric_keys import metric_key
from sem_cls.errors import UserError
from sem_cls.models import backbones, finetune, novelty
from sem_cls.models.calibration import fit_temperature

log = logging.getLogger(__name__)

CLASS_WEIGHTINGS = ("none", "balanced")
# Weight of InceptionV3's auxiliary loss, as in its paper and torchvision's recipe.
AUX_LOSS_WEIGHT = 0.4


class SEMClassifier(LightningModule):
    """Backbone features -> head -> class logits; cross-entropy, Adam by default.

    With `freeze="all"` (or true) the backbone is a fixed feature extractor: no gradients,
    BatchNorm in inference mode with its statistics frozen, so only the head learns. `"none"`
    fine-tunes everything; a number N fine-tunes the last N stages (sem_cls.models.finetune),
    after `unfreeze_after` epochs of head-only training, optionally with layer-wise learning-rate
    decay and a warmup + cosine schedule.

    Probabilities are temperature-scaled: every validation epoch fits the temperature on its
    own logits (sem_cls.models.calibration), so each checkpoint carries the one of its weights.
    A frozen backbone also keeps (a subset of) the training split's features and the novelty
    threshold past which `novelty_val_share` of the validation images lie (sem_cls.models.novelty).
    All three are buffers: checkpoints carry them as tensors.
    """

    def __init__(
        self,
        class_names: list[str],
        backbone: str = "inception_v3",
        pretrained: bool = True,
        weights_file: str | None = None,
        freeze: bool | str | int = True,
        optimizer=None,
        class_weighting: str = "none",
        label_smoothing: float = 0.0,
        unfreeze_after: int = 0,
        layer_decay: float | None = None,
        warmup_epochs: int = 0,
        cosine_decay: bool = False,
        head: str = "linear",
        head_hidden: int = 512,
        head_dropout: float = 0.0,
        aux_logits: bool = False,
        mixup: dict | None = None,
        compile: bool = False,
        tta: bool = False,
        novelty_val_share: float | None = 0.05,
    ):
        super().__init__()
        if class_weighting not in CLASS_WEIGHTINGS:
            raise UserError(
                f"model.class_weighting={class_weighting!r} is not one of {list(CLASS_WEIGHTINGS)}."
            )
        if not 0 <= label_smoothing < 1:
            raise UserError(f"model.label_smoothing={label_smoothing} must be in [0, 1).")
        # The optimizer factory is rebuilt from config, not pickled into checkpoints; compiling
        # and test-time augmentation are choices of the run, not of the model a checkpoint holds.
        self.save_hyperparameters(ignore=["optimizer", "compile", "tta"], logger=False)
        self.class_names = list(class_names)
        self.optimizer_factory = optimizer
        # channels_last: about 1.5x faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
        extra = {"aux_logits": True} if aux_logits else {}
        self.backbone = backbones.create_backbone(backbone, pretrained, weights_file, **extra).to(
            memory_format=torch.channels_last
        )
        stages = finetune.backbone_stages(self.backbone)
        learning = finetune.trainable_stage_count(freeze, len(stages))
        # Frozen throughout: a fixed feature extractor, whose features can be cached.
        self.frozen = learning == 0
        if self.frozen:
            backbones.freeze(self.backbone)
            self.learning_names = set()
        else:
            self.learning_names = set(finetune.freeze_stages(self.backbone, stages, learning))
        # What runs a frozen backbone (sem_cls.data.engines); set by use_engine, else torch.
        self.engine = None
        if compile and not self.frozen:
            # torch.compile where the backbone runs every batch (a frozen one runs once per
            # image, for the cache). In place: the state dict keeps its names.
            self.backbone.compile()
        # Test-time augmentation in evaluation passes (eval.py tta=true).
        self.tta = tta
        # The test sets a test pass reports on ("test", "external/<name>"), set in setup().
        self.test_sets: list[str] = ["test"]
        num_classes = len(self.class_names)
        self.head = finetune.make_head(
            head, self.backbone.num_features, num_classes, head_hidden, head_dropout
        )
        self.aux_head = None
        if aux_logits:
            # InceptionV3's auxiliary classifier, on its 768 pooled features; training only.
            self.backbone.AuxLogits.fc = nn.Identity()
            self.aux_head = nn.Linear(768, num_classes)
        self.mixup = timm.data.Mixup(**mixup, num_classes=num_classes) if mixup else None

        def accuracy(top_k=1):
            return MulticlassAccuracy(num_classes, top_k=top_k, average="micro")

        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc, self.val_acc = accuracy(), accuracy()
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.val_recall = MulticlassRecall(num_classes, average=None)
        self.val_acc_best = MaxMetric()
        # Saved in checkpoints, so a resumed run still knows the best epoch before the kill.
        self.val_acc_best.persistent(True)
        # Training-loss weight per class; set from the training split's counts in setup().
        self.register_buffer("class_weights", torch.ones(num_classes), persistent=False)
        # Targets and class probabilities of the current validation pass, for the reports.
        self.eval_targets, self.eval_logits = CatMetric(), CatMetric()
        # Calibration and novelty: fitted in training, restored from checkpoints.
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer(
            "novelty_references", torch.zeros(0, self.backbone.num_features).half()
        )
        self.register_buffer("novelty_threshold", torch.tensor(float("nan")))
        # Per test set (see setup): test_metrics[i] holds its scores, targets and probabilities.
        self.test_metrics = nn.ModuleList([self._test_metrics()])

    def _test_metrics(self) -> nn.ModuleDict:
        num_classes = len(self.class_names)
        top3 = min(3, num_classes)
        return nn.ModuleDict(
            {
                "loss": MeanMetric(),
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "acc_top3": MulticlassAccuracy(num_classes, top_k=top3, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average=None),
                "targets": CatMetric(),
                "logits": CatMetric(),
                "novelty": CatMetric(nan_strategy="disable"),  # NaN: not scored
            }
        )

    @property
    def takes_features(self) -> bool:
        """True when batches of cached backbone features will do: a frozen backbone, no TTA."""
        return self.frozen and not self.tta

    @property
    def data_config(self) -> dict:
        """Input size, mean/std and interpolation the backbone was trained with."""
        return resolve_model_data_config(self.backbone)

    def head_only(self) -> bool:
        """True while only the head learns: a frozen backbone, or the epochs before unfreezing."""
        return self.frozen or self.current_epoch < self.hparams.unfreeze_after

    def train(self, mode: bool = True):
        super().train(mode)
        if self.head_only():
            # Dropout and stochastic depth inside a frozen backbone stay off while the head trains.
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # From unfreeze_after on, the scheduled stages learn; before, only the head. Set every
        # epoch from the epoch number, so a resumed run is in the right phase too.
        learning = not self.head_only()
        for name, parameter in self.backbone.named_parameters():
            if name in self.learning_names:
                parameter.requires_grad_(learning)
        self.train()

    def use_engine(self, engine) -> None:
        """Run the frozen backbone with `engine` (sem_cls.data.engines) from now on."""
        if not self.frozen:
            raise UserError(
                f"data.engine={engine.name} serves a frozen backbone only; this model fine-tunes "
                f"it (model.freeze={self.hparams.freeze!r}). Set data.engine=torch."
            )
        self.engine = engine

    def backbone_features(self, images: torch.Tensor):
        """(B, 3, H, W) -> (B, num_features), and InceptionV3's auxiliary features or None."""
        if self.frozen and self.engine is not None:
            return self.engine(images), None
        images = images.contiguous(memory_format=torch.channels_last)
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        return features if isinstance(features, tuple) else (features, None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone_features(images)[0])  # (B, num_features) -> (B, num_classes)

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the class probabilities averaged over the 8 flips and 90-degree turns."""
        views = [torch.rot90(v, k, (-2, -1)) for v in (images, images.flip(-1)) for k in range(4)]
        return torch.stack([self(view).float().softmax(1) for view in views]).mean(0).log()

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities, temperature-scaled: (B, num_classes) -> (B, num_classes)."""
        return (logits.float() / self.temperature).softmax(dim=1)

    @property
    def has_novelty(self) -> bool:
        return len(self.novelty_references) > 0 and not self.novelty_threshold.isnan()

    def novelty(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B,) distance to the nearest training image; NaN without
        references (a backbone that learned has none)."""
        if not self.has_novelty:
            return features.new_full((len(features),), float("nan"), dtype=torch.float32)
        return novelty.novelty_scores(features, self.novelty_references)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.class_weighting == "balanced" and datamodule:
            # sklearn's "balanced": n_samples / (n_classes * count), so rare classes weigh more.
            counts = datamodule.class_counts("train")
            weights = counts.sum() / (len(counts) * counts.clip(min=1))
            self.class_weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if stage == "test":
            # One test pass per named set of the datamodule (its dataloader_idx), each with
            # metrics of its own, logged under its name: "test", "external/<name>".
            self.test_sets = list(getattr(datamodule, "test_set_names", None) or ["test"])
            self.test_metrics = nn.ModuleList(self._test_metrics() for _ in self.test_sets)

    def on_fit_start(self) -> None:
        # A frozen backbone's features never change: the novelty references and threshold
        # fitted once hold for every checkpoint of the run.
        datamodule = getattr(self.trainer, "datamodule", None)
        share = self.hparams.novelty_val_share
        if not share or datamodule is None:
            return
        if not self.frozen:
            log.warning(
                "No novelty detection for this model: its backbone learns, so its features "
                "move away from any reference taken now; predictions never say `unknown`."
            )
            return
        train, val = (self.split_features(datamodule, split) for split in ("train", "val"))
        self.novelty_references = novelty.reference_features(train).to(self.device)
        val_scores = novelty.novelty_scores(val.to(self.device), self.novelty_references)
        threshold = novelty.fit_threshold(val_scores, share)
        self.novelty_threshold.fill_(threshold)
        log.info(
            "Novelty: %d training images as references, threshold %.4f (%.0f%% of validation)",
            len(self.novelty_references), threshold, 100 * share,
        )  # fmt: skip

    @torch.no_grad()
    def split_features(self, datamodule, split: str) -> torch.Tensor:
        """(N, num_features) frozen-backbone features of a split: extracted in the datamodule's
        setup, or computed here (cache off, or augmented training images)."""
        if split in datamodule.features:
            return torch.from_numpy(np.asarray(datamodule.features[split])).float()
        loader = torch.utils.data.DataLoader(
            datamodule.image_dataset(datamodule.samples[split]),  # the evaluation transform
            batch_size=datamodule.batch_size,
            num_workers=datamodule.num_workers,
            # A private generator: the workers' seed must not shift the global RNG, or a resumed
            # run (whose generators were restored before this) would train on another stream.
            generator=torch.Generator(),
        )
        # float32, as the loaders feed the backbone when the cache is off.
        return torch.cat(
            [self.backbone_features(b["image"].to(self.device))[0].cpu() for b in loader]
        )

    def _eval_step(self, batch: dict):
        """Loss, logits, targets and backbone features (None under TTA) of an evaluation batch:
        {"image": (B, 3, H, W), "label": (B,)}, or {"features": (B, num_features), ...} of a
        frozen backbone's cache, where only the head runs."""
        targets = batch["label"]
        if "features" in batch:
            features = batch["features"]
        elif self.tta:
            logits = self.tta_logits(batch["image"])  # eight views: no single feature vector
            return F.cross_entropy(logits, targets), logits, targets, None
        else:
            features = self.backbone_features(batch["image"])[0]
        logits = self.head(features)
        return F.cross_entropy(logits, targets), logits, targets, features

    def _step(self, batch: dict, training: bool = False):
        """Loss, logits and targets of a batch (see _eval_step for what a batch holds)."""
        if not training:
            return self._eval_step(batch)[:3]
        targets = batch["label"]
        learned = targets
        if "features" in batch:
            features, aux = batch["features"], None
        else:
            images = batch["image"]
            # timm's Mixup pairs images within a batch, so it needs an even number of them.
            if self.mixup is not None and len(images) % 2 == 0:
                images, learned = self.mixup(images, targets)  # mixed images, soft targets
            features, aux = self.backbone_features(images)
        logits = self.head(features)
        # Weighting and smoothing shape what is learned; evaluation losses stay plain.
        smoothing = 0.0 if learned is not targets else self.hparams.label_smoothing
        loss = F.cross_entropy(
            logits, learned, weight=self.class_weights, label_smoothing=smoothing
        )
        if aux is not None and self.aux_head is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(self.aux_head(aux), learned)
        return loss, logits, targets

    def training_step(self, batch, batch_idx):
        loss, logits, targets = self._step(batch, training=True)
        self.train_loss(loss)
        self.train_acc(logits, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_validation_epoch_start(self):
        self.eval_targets.reset()
        self.eval_logits.reset()

    def validation_step(self, batch, batch_idx):
        loss, logits, targets = self._step(batch)
        self.val_loss(loss)
        self.val_acc(logits, targets)
        self.val_f1(logits, targets)
        self.val_recall(logits, targets)
        self.eval_targets.update(targets)
        self.eval_logits.update(logits.float())
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/f1_macro", self.val_f1, on_step=False, on_epoch=True)

    def _log_recall(self, split: str, recall: MulticlassRecall) -> None:
        # Per-class recall beside accuracy: on imbalanced data a rare class can sit at 0.
        # Plain tensors (torchmetrics objects sync themselves): sync_dist reduces them over DDP
        # ranks, which already agree, since compute() gathered every rank's predictions.
        for name, value in zip(self.class_names, recall.compute(), strict=True):
            key = f"{split}/recall/{metric_key(name)}"  # any folder name, as MLflow keeps it
            self.log(key, value, sync_dist=True, add_dataloader_idx=False)
        recall.reset()

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.val_recall.reset()
            return
        self._log_recall("val", self.val_recall)
        if self.trainer.state.fn == TrainerFn.FITTING:
            # Before ModelCheckpoint saves this epoch: its checkpoint carries its temperature.
            logits, targets = self.eval_logits.compute(), self.eval_targets.compute()
            self.temperature.fill_(fit_temperature(logits, targets))
            self.log("val/temperature", self.temperature, sync_dist=True)
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        loss, logits, targets, features = self._eval_step(batch)
        name, metrics = self.test_sets[dataloader_idx], self.test_metrics[dataloader_idx]
        metrics["loss"](loss)
        for key in ("acc", "acc_top3", "f1_macro", "recall"):
            metrics[key](logits, targets)
        metrics["targets"].update(targets)
        metrics["logits"].update(logits.float())
        unscored = torch.full(targets.shape, float("nan"), device=targets.device)
        metrics["novelty"].update(self.novelty(features) if features is not None else unscored)
        # Named by the test set, not by Lightning's dataloader index.
        for key in ("loss", "acc", "acc_top3", "f1_macro"):
            value = metrics[key]
            self.log(f"{name}/{key}", value, on_epoch=True, on_step=False, add_dataloader_idx=False)

    def on_test_epoch_end(self):
        for name, metrics in zip(self.test_sets, self.test_metrics, strict=True):
            self._log_recall(name, metrics["recall"])

    def _pass(self, test_set: str | None):
        """Targets and logits of the last validation pass, or of test set `test_set`."""
        if test_set is None:
            return self.eval_targets, self.eval_logits
        metrics = self.test_metrics[self.test_sets.index(test_set)]
        return metrics["targets"], metrics["logits"]

    def predictions(self, test_set: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, predicted classes) of the last validation pass, or of test set `test_set`
        of the last test pass."""
        return self._pass(test_set)[0].compute().long(), self.probabilities(test_set).argmax(dim=1)

    def probabilities(self, test_set: str | None = None, calibrated: bool = True) -> torch.Tensor:
        """(N, num_classes) class probabilities of the last validation pass (or of `test_set`),
        in the loader's order; temperature-scaled unless `calibrated=False`."""
        logits = self._pass(test_set)[1].compute()
        return self.calibrated(logits) if calibrated else logits.float().softmax(dim=1)

    def novelty_of_test_pass(self, test_set: str = "test") -> torch.Tensor:
        """(N,) novelty scores of test set `test_set` of the last test pass (NaN without
        references)."""
        return self.test_metrics[self.test_sets.index(test_set)]["novelty"].compute()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        # Checkpoints from before calibration and novelty: temperature 1, no references.
        state.setdefault("temperature", torch.ones(()))
        state.setdefault("novelty_references", self.novelty_references[:0])
        state.setdefault("novelty_threshold", torch.tensor(float("nan")))
        # The references' row count is the checkpoint's, not the empty buffer's.
        self.novelty_references = torch.empty_like(state["novelty_references"])

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("SEMClassifier needs an optimizer factory to train.")
        # Every parameter the schedule will train goes in now; before unfreeze_after they get
        # no gradient, and optimizers leave parameters without one untouched.
        for name, parameter in self.backbone.named_parameters():
            if name in self.learning_names:
                parameter.requires_grad_(True)
        settings = getattr(self.optimizer_factory, "keywords", {})
        heads = [p for module in (self.head, self.aux_head) if module for p in module.parameters()]
        groups = [{"params": heads}] + finetune.backbone_param_groups(
            self.backbone,
            settings.get("lr", 1e-3),
            settings.get("weight_decay", 0.0),
            self.hparams.layer_decay,
        )
        optimizer = self.optimizer_factory(params=groups)
        if not (self.hparams.warmup_epochs or self.hparams.cosine_decay):
            return optimizer
        factor = finetune.warmup_cosine(
            self.hparams.warmup_epochs, self.hparams.cosine_decay, self.trainer.max_epochs
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        schedule = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
