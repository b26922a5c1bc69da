"""Stage 1: supervised fine-tuning on distilled proofs (assistant-only loss, packed sequences).

Paper: SFT of Qwen3-4B-Thinking-2507 on FineProofs-SFT, thinking and proof both trained; the RL stage starts from
the checkpoint after 372 optimizer steps (the paper's other SFT hyperparameters are not public).

Loss: token-weighted mean of the cross-entropy over the labelled tokens of a micro-batch. With packing, this is the
same number as the token-weighted mean of the per-example losses (a test pins it). Across gradient accumulation,
Lightning averages micro-batch means; packed rows hold similar token counts, so the difference from a global token
mean is small, and we keep Lightning's convention rather than a custom accumulation loop. Across data-parallel ranks
the loss is exact: each rank's mean is weighted by its share of the step's labelled tokens (`global_token_mean`), so
N processes train exactly as one process with the same global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qed_lightning.data.chat import IGNORE_INDEX
from qed_lightning.modules.base import QEDModule


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and the count of those positions.

    logits `[B, L, V]`, labels `[B, L]` (IGNORE_INDEX where no loss). Position t predicts labels[t + 1].
    """
    shift_logits = logits[:, :-1].float()  # [B, L-1, V]
    shift_labels = labels[:, 1:]  # [B, L-1]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


class SFTModule(QEDModule):
    """Assistant-only SFT on packed chat sequences.

    Override point: `compute_loss(batch) -> (loss, n_tokens)` to change the objective (e.g. add a length penalty).
    Logs `train/loss`, `train/tokens_per_sec` (labelled tokens per second, step to step), `train/padding_fraction`,
    `train/trained_tokens`, and the data module's truncation/drop counts once.
    """

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["position_ids"])
        loss_sum, n_tokens = packed_lm_loss(logits, batch["labels"])
        return loss_sum / n_tokens.clamp(min=1), n_tokens

    def on_train_start(self) -> None:
        stats = getattr(self.trainer.datamodule, "stats", None) if self.trainer.datamodule else None
        if stats:
            self.log_dict({k: float(v) for k, v in stats.items()}, rank_zero_only=True)

    def global_token_mean(self, loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """Rescale this rank's token mean so that the ranks' average (what DDP/FSDP do to gradients, and `sync_dist`
        to the logged value) is the token mean over every rank's tokens: the loss of one process with the same
        global batch (a distributed test pins it). No-op on one process."""
        world = self.trainer.world_size
        if world == 1:
            return loss
        total = self.trainer.strategy.reduce(n_tokens.detach().float(), reduce_op="sum")
        return loss * (n_tokens * world / total.clamp(min=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self.compute_loss(batch)
        loss = self.global_token_mean(loss, n_tokens)
        elapsed = self.tick()
        total = batch["input_ids"].numel()
        real = int(batch["num_real_tokens"])
        metrics = {
            "train/trained_tokens": n_tokens.float(),
            "train/padding_fraction": torch.tensor(1.0 - real / total),
        }
        if elapsed > 0:  # labelled tokens per second of wall time between consecutive steps (forward+backward+step)
            metrics["train/tokens_per_sec"] = n_tokens.detach().float() / elapsed
        self.log_dict(metrics, prog_bar=False, batch_size=batch["input_ids"].size(0))
        self.log("train/loss", loss.detach(), batch_size=batch["input_ids"].size(0), sync_dist=True)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["position_ids"])
        loss_sum, n_tokens = packed_lm_loss(logits, batch["labels"])
        self.log("val/loss", loss_sum / n_tokens.clamp(min=1), batch_size=batch["input_ids"].size(0), sync_dist=True)
