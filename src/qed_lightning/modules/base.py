"""The small base every stage module shares: load a causal LM, build the optimizer, export to HF format.

Weights load in `configure_model` (idempotent, so FSDP/DeepSpeed strategies can wrap the model after it exists),
never in `__init__`: building a module is cheap, so a config with a typo fails before any weight is read.
The optimizer and the LR schedule are injected as callables (`OptimizerCallable`, `LRSchedulerCallable`), so the
YAML chooses them by `class_path`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)


class QEDModule(L.LightningModule):
    """Shared base of `SFTModule`, `RubricRLModule` and `ReasoningCacheRLModule`.

    Args:
        model_name_or_path: hub id or local folder of a causal LM (loaded in `configure_model`).
        optimizer: optimizer factory, e.g. `class_path: torch.optim.AdamW` with `init_args: {lr: 1e-6}`.
        lr_scheduler: optional LR scheduler factory, stepped every optimizer step.
        dtype: dtype the weights are loaded in ("float32" on CPU; "bfloat16" with `precision: bf16-true`).
        attn_implementation: transformers attention backend ("sdpa", "eager", "flash_attention_2"); None = default.
        gradient_checkpointing: recompute activations in the backward pass (saves memory on long sequences).
        export_hf: write the final weights with `save_pretrained` when training ends.
        export_dir: where to export (None = `<run dir>/hf`, next to the run's metrics and config).
    """

    #: init arguments that are components (not plain values) and so stay out of `hparams`
    _hparams_ignore: tuple[str, ...] = ("optimizer", "lr_scheduler")

    def __init__(
        self,
        model_name_or_path: str,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        export_hf: bool = True,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self._hparams_ignore))
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self._step_clock: float | None = None

    # -- model ---------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            self._load_model()
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy (FSDP2): shard layer by layer
            from qed_lightning.parallel import apply_fsdp2

            apply_fsdp2(self.model, self.device_mesh["data_parallel"])

    def _load_model(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hp = self.hparams
        kwargs = {"dtype": DTYPES[hp.dtype]}
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        strategy = getattr(self._trainer, "strategy", None)
        if getattr(strategy, "zero_stage_3", False):
            # DeepSpeed ZeRO-3 (Lightning runs this hook inside `deepspeed.zero.Init`): transformers must know, so it
            # loads each weight into its partitions; the config object must stay alive while the model is used
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(strategy.config)
        self.model = AutoModelForCausalLM.from_pretrained(hp.model_name_or_path, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(hp.model_name_or_path)
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.model.train(self.training)
        rank_zero_info(f"loaded {hp.model_name_or_path} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters)")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, L, V]` of a packed batch (attention mask None: transformers builds it from position ids).

        sdpa/eager turn restarting position ids into a block-diagonal mask for any batch size, but transformers'
        flash-attention path only detects packed sequences in a single row, so with flash attention a `[B, L]`
        batch runs as one `[1, B * L]` row (its padding is a segment of its own, see `data.packing`).
        """
        return self._packed_call(input_ids, position_ids, lambda **kw: self.model(**kw, use_cache=False).logits)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final (normed) hidden states `[B, L, H]` of a packed batch, for losses that apply the LM head
        themselves (`qed_lightning.lm_head`); same flash-attention flattening as `forward`."""
        from qed_lightning.lm_head import final_hidden_states

        return self._packed_call(input_ids, position_ids,
                                 lambda **kw: final_hidden_states(self.model, **kw, use_cache=False)[0])

    def _packed_call(self, input_ids: torch.Tensor, position_ids: torch.Tensor, run) -> torch.Tensor:
        """`run(input_ids=..., position_ids=...)` -> `[rows, L, D]`, as one row under flash attention (see `forward`)."""
        batch, length = input_ids.shape
        if batch > 1 and str(getattr(self.model.config, "_attn_implementation", "")).startswith("flash"):
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        return run(input_ids=input_ids, position_ids=position_ids).reshape(batch, length, -1)

    # -- optimisation --------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def tick(self) -> float:
        """Seconds since the previous call (0 at the first), for throughput metrics."""
        now = time.perf_counter()
        elapsed = 0.0 if self._step_clock is None else now - self._step_clock
        self._step_clock = now
        return elapsed

    # -- export --------------------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) state dict on CPU; strategies that shard override the gathering."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if any(hasattr(p, "ds_id") for p in self.model.parameters()):  # DeepSpeed ZeRO-3: gather one by one
            from qed_lightning.rollout.sync import iter_full_parameters

            zero = self.trainer.is_global_zero
            return {k: v.cpu() for k, v in iter_full_parameters(self.model) if zero}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def export_hf(self, out_dir: str | Path) -> Path:
        """Save model + tokenizer in HF format (loadable by transformers and vLLM)."""
        out = Path(out_dir)
        # tied weights once (a gathered state dict holds separate copies, which save_pretrained would both write)
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        state = {k: v for k, v in self.full_state_dict().items() if k not in tied}
        if self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out, state_dict=state)
            self.tokenizer.save_pretrained(out)
            rank_zero_info(f"exported HF model to {out}")
        return out

    def on_train_end(self) -> None:
        # a pre-empted run (PreemptionCheckpoint) resumes later: exporting its intermediate weights would only spend
        # the grace period before the kill
        preempted = any(getattr(cb, "preempted", False) for cb in self.trainer.callbacks)
        if self.hparams.export_hf and not preempted:
            self.export_hf(self.hparams.export_dir or self.run_dir / "hf")
