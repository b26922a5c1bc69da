"""Measurements 4 and 5 of the GPU check, for one strategy, in a process of its own (a process group, a DeepSpeed
engine, an FSDP2 mesh each; a fresh process keeps the strategies apart):

    python -m qed_lightning.gpu_check.rl_step --strategy zero2 --model DIR --device cuda --out zero2.json

Each fit is a real Lightning `Trainer` (1 device) running `RubricRLModule`'s step on fixed synthetic rollouts and
rewards (`FixedRolloutRL`: generation and grading replaced, the optimisation path untouched):
- "precision": one AdamW step at lr 1e-6 (weight decay 0.01); the share of master weights that changed (DeepSpeed's
  fp32 master copy under ZeRO, the fp32 shards under FSDP2, the bf16 weights themselves with `pure_bf16`);
- "rl": one SGD step at lr 1 without clipping, so the update is the gradient, with 1 and with 4 micro-batches: the
  gradient norms, the updates' relative difference, and a fixed sample of the update for comparing strategies.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from qed_lightning.data.records import ProofProblem
from qed_lightning.modules import RubricRLModule
from qed_lightning.rollout.base import Completion, RolloutEngine

#: strategy name -> (trainer precision, model dtype, module extras)
SETTINGS = {
    "none": ("bf16-mixed", "float32", {}),
    "fsdp2": ("bf16-mixed", "float32", {}),
    "zero2": ("bf16-mixed", "float32", {}),
    "zero3": ("bf16-mixed", "float32", {}),
    "pure_bf16": ("bf16-true", "bfloat16", {"pure_bf16": True}),
}
SKETCH = 1 << 20  # update elements sampled (fixed positions) to compare strategies


class NullEngine(RolloutEngine):
    """An engine for runs that never generate: weight pushes are accepted and ignored (nothing is gathered)."""

    def generate(self, prompts, sampling, n=1):
        raise RuntimeError("NullEngine does not generate")

    def load_weights(self, named_tensors) -> None:
        pass


class _NoJudge:
    """`RubricRLModule` wants a judge; measurements that never grade use this (its counters are empty)."""

    def pop_metrics(self) -> dict:
        return {}

    def check_failures(self, grades, step: int) -> float:
        return 0.0  # fixed rewards: no grade ever fails


class FixedRolloutRL(RubricRLModule):
    """`RubricRLModule` on fixed rollouts and rewards: no engine, no judge, the step's optimisation path as it is."""

    _hparams_ignore = ("optimizer", "lr_scheduler", "engine", "judge", "rollouts", "rewards")

    def __init__(self, model_name_or_path: str, rollouts: list[Completion], rewards: list[float], **kwargs) -> None:
        kwargs.setdefault("rollout_log", "off")  # a measurement: nothing to keep, and no judge to extract proofs
        super().__init__(model_name_or_path, engine=NullEngine(), judge=_NoJudge(), **kwargs)
        self.fixed, self.fixed_rewards = rollouts, rewards

    def generate_rollouts(self, problems, n):
        return list(self.fixed)

    def compute_rewards(self, problems, rollouts):
        from qed_lightning.rewards.types import Grade

        grades = [Grade(score=round(7 * r), reward=r, status="ok") for r in self.fixed_rewards]
        return torch.tensor(self.fixed_rewards), torch.ones(len(rollouts), dtype=torch.bool), grades


def synthetic_rollouts(vocab: int, prompts: int, group: int, prompt_tokens: int, lengths: tuple[int, int],
                       seed: int = 0) -> tuple[list[Completion], list[float]]:
    """`prompts` x `group` rollouts of random tokens (the sampler's log-prob set to a uniform distribution's, which
    a random-weight model is close to: ratios near 1), and rewards spread within each group."""
    gen = torch.Generator().manual_seed(seed)
    rollouts, rewards = [], []
    for p in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_tokens,), generator=gen).tolist()
        for g in range(group):
            n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
            rollouts.append(Completion(prompt, torch.randint(3, vocab, (n,), generator=gen).tolist(),
                                       [-math.log(vocab)] * n, "stop", ""))
            rewards.append((g + p) % group / max(group - 1, 1))
    return rollouts, rewards


def budget_for(rollouts: list[Completion], micro_batches: int) -> int:
    """The smallest "padded" token budget that splits `rollouts` into at most `micro_batches` micro-batches."""
    from qed_lightning.rl.microbatch import plan_microbatches

    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    budget = max(lengths)
    while len(plan_microbatches(lengths, budget, "padded")) > micro_batches:
        budget += max(lengths) // 8
    return budget


def master_weights(module: RubricRLModule) -> dict[str, Tensor]:
    """The trainable weights the optimizer updates, full and on CPU: DeepSpeed's fp32 master copy, FSDP2's fp32
    shards gathered, or the parameters themselves."""
    engine = module.policy_update.deepspeed_engine()
    out = {}
    for name, p in module.model.named_parameters():
        if engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            t = safe_get_full_fp32_param(p)
        else:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().to("cpu", copy=True)
    return out


class _Capture(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.before = master_weights(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.after = master_weights(pl_module)
        self.grad_norm = float(trainer.callback_metrics["train/grad_norm"])
        self.micro_batches = float(trainer.callback_metrics["train/micro_batches"])


def _strategy(name: str):
    from qed_lightning.parallel import DeepSpeedStrategy, FSDP2Strategy

    return {"fsdp2": FSDP2Strategy, "zero2": lambda: DeepSpeedStrategy(stage=2),
            "zero3": lambda: DeepSpeedStrategy(stage=3)}.get(name, lambda: "auto")()


def fit_once(args, rollouts, rewards, optimizer, budget: int) -> _Capture:
    precision, dtype, extra = SETTINGS[args.strategy]
    module = FixedRolloutRL(args.model, rollouts, rewards, dtype=dtype, group_size=args.group,
                            micro_batch_tokens=budget, micro_batch_layout="padded", logits_chunk_tokens=args.chunk,
                            grad_clip=0.0, optimizer=optimizer, export_hf=False, **extra)
    capture = _Capture()
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        strategy=_strategy(args.strategy), precision=precision, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[capture])
    problems = [ProofProblem(i, "synthetic", "synthetic") for i in range(len(rollouts) // args.group)]
    loader = torch.utils.data.DataLoader([problems], batch_size=1, collate_fn=_first)
    trainer.fit(module, train_dataloaders=loader)
    return capture


def _first(batch: list) -> list:
    return batch[0]


def _delta(c: _Capture) -> Tensor:
    return torch.cat([(c.after[k].float() - c.before[k].float()).reshape(-1) for k in sorted(c.before)])


def run(args) -> dict:
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rollouts, rewards = synthetic_rollouts(vocab, args.prompts, args.group, args.prompt_tokens, tuple(args.lengths))
    one = budget_for(rollouts, 1)
    out = {"strategy": args.strategy, "precision_setting": SETTINGS[args.strategy][:2]}
    started = time.perf_counter()
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.01)  # noqa: E731
    c = fit_once(args, rollouts, rewards, adamw, one)
    changed = sum(int((c.after[k] != c.before[k]).sum()) for k in c.before)
    out["precision"] = {"lr": 1e-6, "changed_fraction": changed / sum(t.numel() for t in c.before.values()),
                        "master_dtype": str(next(iter(c.after.values())).dtype)}
    if args.strategy != "pure_bf16":
        sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
        runs = [fit_once(args, rollouts, rewards, sgd, budget) for budget in (one, budget_for(rollouts, 4))]
        d1, d4 = _delta(runs[0]), _delta(runs[1])
        out["rl"] = {"micro_batches": [r.micro_batches for r in runs], "grad_norm": [r.grad_norm for r in runs],
                     "update_norm": [float(d1.norm()), float(d4.norm())],
                     "update_rel_diff_1_vs_4": float((d4 - d1).norm() / d1.norm().clamp(min=1e-30))}
        index = torch.randint(0, d1.numel(), (min(SKETCH, d1.numel()),), generator=torch.Generator().manual_seed(0))
        torch.save(d1[index], Path(args.out).with_suffix(".sketch.pt"))
    out["wall_s"] = time.perf_counter() - started
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPU check, measurements 4-5, one strategy")
    parser.add_argument("--strategy", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
