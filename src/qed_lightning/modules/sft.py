"""Stage 1: supervised fine-tuning on distilled proofs (assistant-only loss, packed sequences).

Paper: SFT of Qwen3-4B-Thinking-2507 on FineProofs-SFT, thinking and proof both trained; the RL stage starts from
the checkpoint after 372 optimizer steps (the paper's other SFT hyperparameters are not public).

Memory: with `loss_chunk_tokens` (default 1,024) the LM head runs only on labelled positions, a chunk at a time
under activation checkpointing (`chunked_lm_loss`). At the paper's scale (32k-token rows, a 152k vocabulary) the
full path holds the bf16 logits (~10 GB), their float32 copy (~20 GB) and the cross-entropy's saved softmax; the
chunked path holds one chunk's float32 logits (~0.6 GB at 1,024 tokens) and recomputes them in backward, for one
more LM-head forward. `scripts/bench_sft_memory.py` (152k vocabulary, a 4,096-token row, CPU): the step's peak
above the loaded model falls from 7.5 GB to 2.3 GB, and the step is no slower. `loss_chunk_tokens: 0` restores the
full-logits path.

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
from qed_lightning.model.forward import chunked_lm_loss
from qed_lightning.modules.base import QEDModule


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and the count of those positions.

    logits `[B, L, V]`, labels `[B, L]` (IGNORE_INDEX where no loss). Position t predicts labels[t + 1].
    """
    shift_logits = logits[:, :-1]
    shift_logits = shift_logits.to(torch.promote_types(shift_logits.dtype, torch.float32))  # [B, L-1, V]
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

    def __init__(self, model_name_or_path: str, loss_chunk_tokens: int = 1024, **kwargs) -> None:
        """`QEDModule`'s arguments pass through `**kwargs`.

        Args:
            model_name_or_path: hub id or local folder of the model; also the data's tokenizer (linked).
            loss_chunk_tokens: labelled positions per LM-head chunk of the loss (see the module docstring; 0 = every
                position's logits at once).
        """
        super().__init__(model_name_or_path, **kwargs)
        if loss_chunk_tokens < 0:
            raise ValueError(f"model.loss_chunk_tokens must be >= 0 (0 = no chunking), got {loss_chunk_tokens}")

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over the batch's labelled tokens, and their count."""
        chunk = self.hparams.loss_chunk_tokens
        if chunk:
            hidden = self.hidden_states(batch["input_ids"], batch["position_ids"])
            return chunked_lm_loss(hidden, batch["labels"], self.model.get_output_embeddings(), chunk)
        return packed_lm_loss(self(batch["input_ids"], batch["position_ids"]), batch["labels"])

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, n_tokens = self.lm_loss(batch)
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
        loss_sum, n_tokens = self.lm_loss(batch)
        self.log("val/loss", loss_sum / n_tokens.clamp(min=1), batch_size=batch["input_ids"].size(0), sync_dist=True)
