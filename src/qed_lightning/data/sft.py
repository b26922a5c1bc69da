"""FineProofs-SFT as a LightningDataModule: validate, template, mask, truncate or drop, pack.

Truncation policy (`truncation`):
- "drop" (default): an example longer than `max_length` tokens is left out. A truncated proof trace teaches the
  model to stop mid-thought, which is the length failure mode the paper warns about, so we would rather lose it.
- "truncate": keep the first `max_length` tokens (the loss then covers the start of the thinking only).
- "thinking": keep the example, cutting the end of its thinking (the tokens just before `</think>`) so that the
  prompt, the start of the thinking and the whole proof fit; the `</think>` after the cut carries no loss. An
  example whose prompt and proof alone exceed `max_length` is dropped. This keeps every proof of a long trace
  (DeepSeek-Math-V2's run past 100k tokens) at the price of training on shortened thinking.
Every policy counts what it did: `data/truncated` (examples over `max_length`), `data/dropped`, `data/thinking_cut`,
reported at setup (a warning when more than 5% of the examples are dropped) and in `<run>/data_report.json` with
the token-length percentiles of the data, so the cost of `max_length` is visible before training. Raising
`max_length` instead costs activation memory linear in the row length (packing, gradient checkpointing and the
chunked LM head keep it linear; see `docs/`).

Malformed rows stop the run, naming each by line and column, or are skipped (`on_invalid_row`, `validation.py`).
"""

from __future__ import annotations

import json
import logging
import random
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from qed_lightning.data.chat import TokenizedExample, tokenize_conversation
from qed_lightning.data.loading import DataError, load_table
from qed_lightning.data.validation import RowPolicy, chat_messages, find_rejects, remap
from qed_lightning.data.packing import collate_rows, first_fit_decreasing, pack_row

log = logging.getLogger(__name__)


class SFTDataModule(L.LightningDataModule):
    """Chat-format SFT data (FineProofs-SFT or any file with a `messages` column).

    Args:
        path: hub id (e.g. "lm-provers/FineProofs-SFT") or a local .jsonl/.json/.parquet file.
        tokenizer: tokenizer name or folder; linked to the model's `model_name_or_path` by `qed-fit`.
        subset: hub config name (FineProofs-SFT has "default" and "all").
        split: hub split.
        columns: map of our field names onto the file's columns, e.g. {"messages": "conversation"}.
        max_length: maximum tokens per example (and per packed row).
        truncation: "drop", "truncate" or "thinking" (cut the end of the thinking, keep the proof) for examples
            longer than `max_length` (see module docstring).
        packing: pack several examples per row (position ids restart per example).
        batch_size: rows per micro-batch.
        val_fraction: fraction of examples held out for validation (0 = no validation loop).
        on_invalid_row: "error" (refuse the data, naming every bad row) or "skip" (train on the valid rows; the
            rejects go to `<run>/data_rejects.jsonl`).
        max_invalid_fraction: with "skip", the largest share of rejected rows a run starts with.
        seed: seed of the split and of the packing order.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: str = "lm-provers/FineProofs-SFT",
        tokenizer: str | None = None,
        subset: str | None = None,
        split: str = "train",
        columns: dict[str, str] | None = None,
        max_length: int = 16384,
        truncation: Literal["drop", "truncate", "thinking"] = "drop",
        packing: bool = True,
        batch_size: int = 1,
        val_fraction: float = 0.0,
        on_invalid_row: Literal["error", "skip"] = "error",
        max_invalid_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if max_length < 2:
            problems.append(f"data.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            problems.append(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= max_invalid_fraction <= 1.0:
            problems.append(f"data.max_invalid_fraction must be in [0, 1], got {max_invalid_fraction}")
        if problems:
            raise ValueError("; ".join(problems))
        # the whole config is logged (LogConfigCallback): no hparam merge, so data.seed may differ from model.seed
        self.save_hyperparameters(logger=False)
        self.policy = RowPolicy(on_invalid_row, max_invalid_fraction)
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.stats: dict[str, float] = {}
        self.pad_id = 0

    def _tokenizer(self):
        from transformers import AutoTokenizer

        if self.hparams.tokenizer is None:
            raise ValueError("SFTDataModule needs `data.tokenizer` (qed-fit links it to model.model_name_or_path).")
        return AutoTokenizer.from_pretrained(self.hparams.tokenizer)

    def _examples(self, tokenizer) -> list[TokenizedExample]:
        hp = self.hparams
        table = load_table(hp.path, subset=hp.subset, split=hp.split)
        rejects = find_rejects(table, {"messages": chat_messages}, hp.columns)
        trainer = self.trainer
        run_dir = Path(trainer.default_root_dir) if trainer is not None and trainer.is_global_zero else None
        skipped = self.policy.apply(table.where, rejects, table.total, run_dir)
        rows = [row for row, line in zip(table.rows, table.positions, strict=True) if line not in skipped]
        examples, lengths, dropped, truncated, cut, no_labels = [], [], 0, 0, 0, 0
        for row in rows:
            ex = tokenize_conversation(tokenizer, remap(row, hp.columns, ["messages"])["messages"], hp.max_length,
                                       cut_thinking=hp.truncation == "thinking")
            lengths.append(ex.full_length)
            if ex.truncated:
                truncated += 1
                cut += ex.thinking_cut > 0
                if hp.truncation == "drop" or len(ex.input_ids) > hp.max_length:
                    dropped += 1
                    continue
            if ex.num_trained == 0:
                no_labels += 1
                continue
            examples.append(ex)
        self.stats = {"data/examples": len(rows), "data/truncated": truncated, "data/dropped": dropped + no_labels,
                      "data/thinking_cut": cut, "data/rejected": len(skipped)}
        self._report(lengths, run_dir)
        if not examples:
            raise DataError(f"{hp.path}: all {len(rows)} examples were dropped ({truncated} longer than "
                            f"data.max_length={hp.max_length}); raise data.max_length or set data.truncation=truncate.")
        return examples

    def _report(self, lengths: list[int], run_dir: Path | None) -> None:
        """Warn when many examples are dropped; write `<run>/data_report.json` (counts, length percentiles)."""
        hp, s = self.hparams, self.stats
        share = s["data/dropped"] / max(s["data/examples"], 1)
        if share > 0.05:
            log.warning("%d of %d SFT examples (%.0f%%) are not trained on (longer than data.max_length=%d with "
                        "truncation=%s, or no assistant tokens): raise data.max_length, or set "
                        "data.truncation=thinking to keep their proofs", s["data/dropped"], s["data/examples"],
                        100 * share, hp.max_length, hp.truncation)
        if run_dir is None or not lengths:
            return
        ordered = sorted(lengths)
        pct = {f"p{q}": ordered[min(len(ordered) - 1, len(ordered) * q // 100)] for q in (50, 90, 99)}
        report = {"path": hp.path, "max_length": hp.max_length, "truncation": hp.truncation,
                  **{k.removeprefix("data/"): v for k, v in s.items()}, "tokens": {**pct, "max": ordered[-1]}}
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        hp = self.hparams
        tokenizer = self._tokenizer()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        examples = self._examples(tokenizer)
        random.Random(hp.seed).shuffle(examples)
        n_val = int(round(len(examples) * hp.val_fraction))
        self.train_rows = self._rows(examples[n_val:])
        self.val_rows = self._rows(examples[:n_val])
        real = sum(len(r["input_ids"]) for r in self.train_rows)
        capacity = len(self.train_rows) * hp.max_length if hp.packing else real
        self.stats["data/rows"] = len(self.train_rows)
        self.stats["data/pack_fill"] = real / max(capacity, 1)
        rank_zero_info(
            f"SFT data: {self.stats['data/examples']} examples from {hp.path}, {self.stats['data/truncated']} over "
            f"max_length={hp.max_length} ({hp.truncation}), {self.stats['data/dropped']} dropped, "
            f"{self.stats['data/thinking_cut']} with their thinking cut, "
            f"{self.stats['data/rejected']} rejected rows, {len(self.train_rows)} train rows, "
            f"{len(self.val_rows)} val rows"
        )

    def _rows(self, examples: list[TokenizedExample]) -> list[dict]:
        if not self.hparams.packing:
            return [pack_row([ex]) for ex in examples]
        bins = first_fit_decreasing([len(ex.input_ids) for ex in examples], self.hparams.max_length)
        return [pack_row([examples[i] for i in b]) for b in bins]

    def _loader(self, rows: list[dict], shuffle: bool) -> DataLoader:
        return DataLoader(
            rows,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=partial(collate_rows, pad_id=self.pad_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_rows, shuffle=False) if self.val_rows else []
