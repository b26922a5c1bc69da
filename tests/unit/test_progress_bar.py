"""The demo configs' progress bar: no "Epoch 0/-2" on step-bounded runs (Lightning sets max_epochs to -1 when a
fit is bounded by max_steps alone), Lightning's own label otherwise. Real fits of Lightning's BoringModel."""

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from qed_lightning.callbacks import QEDProgressBar


class _Recording(QEDProgressBar):
    labels: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _Recording.labels.append(self._get_train_description(trainer.current_epoch).strip())
        super().on_train_epoch_end(trainer, pl_module)


def _label(tmp_path, **limits) -> str:
    _Recording.labels = []
    trainer = L.Trainer(callbacks=[_Recording()], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_train_batches=2, limit_val_batches=0, **limits)
    trainer.fit(BoringModel())
    return _Recording.labels[0]


def test_step_bounded_run_has_no_negative_epoch_bound(tmp_path):
    assert _label(tmp_path, max_steps=2) == "Epoch 0"


def test_epoch_bounded_run_keeps_lightnings_label(tmp_path):
    assert _label(tmp_path, max_epochs=3) == "Epoch 0/2"
