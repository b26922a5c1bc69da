"""The small base every stage module shares: load a causal LM, build the optimizer, export to HF format.

Weights load in `configure_model` (idempotent, so FSDP/DeepSpeed strategies can wrap the model after it exists),
never in `__init__`: building a module is cheap, so a config with a typo fails before any weight is read.
The optimizer and the LR schedule are injected as callables (`OptimizerCallable`, `LRSchedulerCallable`), so the
YAML chooses them by `class_path`.

Precision (`qed_lightning.model.precision`): weights train in float32 with bf16 compute
(`trainer.precision: bf16-mixed`, FSDP2's mixed-precision policy, DeepSpeed's fp32 master copy); bf16 weights without
a master copy lose the small updates of a low learning rate and are refused at `setup` unless `pure_bf16` (then a
warning gives the numbers).
Strategies: FSDP1 is refused at `setup` (`parallel.refuse_unsupported_strategy`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qed_lightning.model.optim import WarmupCosineLR

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
        export_dir: where to export (None = `<trainer.default_root_dir>/hf`: a fixed place, the one the next stage's
            config names, e.g. `configs/rl.yaml` reads `runs/sft/hf`; a resumed run exports there too).
        pure_bf16: allow training bf16 weights without an fp32 master copy (`dtype: bfloat16`, or `bf16-true`
            outside DeepSpeed); refused otherwise, since updates below half a bf16 step are lost (see
            `qed_lightning.model.precision`). With it, a warning states how many weights an update of ~lr cannot move.
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
        pure_bf16: bool = False,
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

    def setup(self, stage: str) -> None:
        """Errors at the door, before any weight loads: the strategy (FSDP1 is refused) and the weights' precision."""
        from qed_lightning.parallel import refuse_unsupported_strategy
        from qed_lightning.model.precision import weights_are_half

        strategy = self.trainer.strategy
        refuse_unsupported_strategy(strategy)
        if self._deepspeed() or self.hparams.pure_bf16 or stage != "fit":
            return  # DeepSpeed keeps an fp32 master copy in its optimizer whatever the module's dtype
        if weights_are_half(self.hparams.dtype, self.trainer.precision):
            raise ValueError(
                f"model.dtype={self.hparams.dtype} with trainer.precision={self.trainer.precision} trains 16-bit "
                "weights without an fp32 master copy: an update below half a bf16 step (2^-8 of the weight) is lost, "
                "so at lr 1e-6 ~98% of the weights never move. Use trainer.precision=bf16-mixed with "
                "model.dtype=float32 (bf16 compute on fp32 weights; FSDP2 and DeepSpeed keep fp32 masters too), or "
                "set model.pure_bf16=true to train bf16 weights anyway.")

    def on_fit_start(self) -> None:
        if self.hparams.pure_bf16 and any(p.dtype in (torch.bfloat16, torch.float16) for p in self.parameters()):
            from qed_lightning.model.precision import lost_update_warning

            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
            rank_zero_warn(lost_update_warning([p for p in self.parameters() if p.requires_grad], lr))

    def _deepspeed(self) -> bool:
        from qed_lightning.parallel.distributed import is_deepspeed

        return is_deepspeed(self.trainer.strategy)

    def configure_model(self) -> None:
        if self.model is None:
            self._load_model()
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy (FSDP2): shard layer by layer
            from qed_lightning.parallel import apply_fsdp2
            from qed_lightning.model.precision import fsdp2_policy

            # bf16-mixed: fp32 sharded parameters, gathered in bf16 for compute, gradients reduced in fp32
            apply_fsdp2(self.model, self.device_mesh["data_parallel"], fsdp2_policy(self.trainer.precision))

    def _load_model(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qed_lightning.parallel.distributed import is_zero3

        hp = self.hparams
        kwargs = {"dtype": DTYPES[hp.dtype]}
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        strategy = getattr(self._trainer, "strategy", None)
        if is_zero3(strategy):
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
        millions = sum(p.numel() for p in self.model.parameters()) / 1e6
        rank_zero_info(f"loaded {hp.model_name_or_path} ({millions:.2f}M parameters)")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                lengths: list[int] | None = None) -> torch.Tensor:
        """Logits `[B, L, V]` of a packed batch (attention mask None: transformers builds it from position ids).

        sdpa/eager turn restarting position ids into a block-diagonal mask for any batch size; a varlen (flash)
        backend runs the batch as one `[1, B * L]` row (its padding is a segment of its own, see `data.packing`) and
        gets the sequence boundaries once (`qed_lightning.model.attention`): `lengths`, the sequences' lengths in order,
        when the caller knows them, else read from the position ids.
        """
        return self._packed_call(input_ids, position_ids, lambda **kw: self.model(**kw, use_cache=False).logits,
                                 lengths)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      lengths: list[int] | None = None) -> torch.Tensor:
        """The decoder's final (normed) hidden states `[B, L, H]` of a packed batch, for losses that apply the LM head
        themselves (`qed_lightning.model.forward`); same varlen handling as `forward`."""
        from qed_lightning.model.forward import final_hidden_states

        return self._packed_call(input_ids, position_ids,
                                 lambda **kw: final_hidden_states(self.model, **kw, use_cache=False)[0], lengths)

    @property
    def varlen_attention(self) -> bool:
        """Whether the model's attention backend runs packed rows as varlen attention (flash-style, by capability)."""
        from qed_lightning.model.attention import packs_without_mask

        return self.model is not None and packs_without_mask(self.model.config)

    def _packed_call(self, input_ids: torch.Tensor, position_ids: torch.Tensor, run,
                     lengths: list[int] | None = None) -> torch.Tensor:
        """`run(input_ids=..., position_ids=..., [varlen boundaries])` -> `[rows, L, D]` (see `forward`)."""
        batch, length = input_ids.shape
        if not self.varlen_attention:
            return run(input_ids=input_ids, position_ids=position_ids).reshape(batch, length, -1)
        from qed_lightning.model.attention import segment_lengths, varlen_kwargs

        bounds = varlen_kwargs(lengths if lengths is not None else segment_lengths(position_ids), input_ids.device)
        out = run(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1), **bounds)
        return out.reshape(batch, length, -1)

    # -- optimisation --------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        from qed_lightning.parallel import DeepSpeedStrategy

        optimizer = self.optimizer_factory(self.parameters())
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DeepSpeedStrategy):  # offloaded optimizer: DeepSpeed's CPU Adam, before the schedule
            optimizer = strategy.optimizer_for_offload(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and self._trainer is not None:
            scheduler.follow_run(self.trainer.max_steps)  # the run's max_steps, command line included (optim.py)
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
        """The run's folder, `trainer.default_root_dir`: checkpoints, rollouts and the export live here, not in the
        logger's `csv/version_N` (which changes on every resume)."""
        return Path(self.trainer.default_root_dir)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) state dict on CPU; strategies that shard override the gathering."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from qed_lightning.parallel.distributed import is_distributed

        if any(hasattr(p, "ds_id") for p in self.model.parameters()):  # DeepSpeed ZeRO-3: gather one by one
            from qed_lightning.parallel.distributed import iter_full_parameters

            zero = self.trainer.is_global_zero
            return {k: v.cpu() for k, v in iter_full_parameters(self.model) if zero}
        if is_distributed():
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
