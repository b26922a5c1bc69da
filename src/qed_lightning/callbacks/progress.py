"""A rich progress bar whose epoch label is right for step-bounded runs.

Lightning's `RichProgressBar` labels the bar "Epoch {e}/{max_epochs - 1}". A run bounded by `max_steps` alone (every
RL config) has `max_epochs = -1`, so the label read "Epoch 1/-2". This bar keeps Lightning's label when an epoch
bound exists and drops the bound otherwise.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class QEDProgressBar(RichProgressBar):
    """`RichProgressBar` (same arguments) without the negative epoch bound of step-bounded runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description
