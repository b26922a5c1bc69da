"""What `scripts/bench_rl.py` measures beyond steps/s: the asynchronous layout's side, the machine's GEMM peak, CPU
seconds of a side's whole process tree, the share of the peak each phase reaches, and the component speeds the
layout simulator (`scripts/simulate_layout.py`) takes as input (`--throughputs-out`).

- Peak: float32 `torch.mm` of two 1024 x 1024 matrices on one thread, best of several runs (GFLOP/s per core).
- FLOPs per token: 2 x (parameters of every linear layer, the LM head included) forward, 3 x that for forward +
  backward; attention's own O(T^2) work is left out (under 3% here at ~150-token sequences). Generation share =
  generated tokens x forward FLOPs / generation seconds / cores; training share = trained tokens (prompt once per
  micro-batch in the shared-prefix layout, as it runs) x 3 x forward FLOPs / training seconds / cores.
- Throughputs for the simulator, measured on the running pool after training (`AsyncProbe.teardown`): decode
  tokens/s of one sequence alone and of the step's full batch (`prompts x G` sequences at once), the seconds a weight
  push costs the trainer (write) plus the servers (pause, reload, resume), trained tokens/s from the run's training
  phases, the judge's mean latency; and the run's completion and prompt lengths.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def async_engine(max_lag: int, update_mode: str) -> dict:
    """The `model.engine` of the ours-async side: configs/layout/one_node_async.yaml's, core 1 generates, core 0
    trains."""
    return {"class_path": "qed_lightning.rollout.StreamingRollouts", "init_args": {
        "max_lag": max_lag, "engine": {"class_path": "qed_lightning.rollout.LocalVLLMPool", "init_args": {
            "cpus": ["1"], "trainer_cpus": "0", "update_mode": update_mode, "max_model_len": 2048}}}}


def peak_gemm_gflops(n: int = 1024, repeats: int = 7) -> float:
    """Best float32 GEMM GFLOP/s of one thread (the caller's thread setting is restored)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(threads)
    return 2 * n**3 / best / 1e9


def forward_flops_per_token(model_dir: str) -> float:
    """2 x the weights of every linear layer (LM head included: a tied head still runs its GEMM)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * weights


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (a side's vLLM server included)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def probe_class():
    """`AsyncProbe`, defined where lightning is imported (the bench's --side subprocess)."""
    import lightning as L

    class AsyncProbe(L.Callback):
        """Records each step's rollout lengths and CPU seconds; after training, measures the pool's speeds."""

        out: str | None = None  # where teardown writes the throughputs JSON (None: nothing measured)
        record: dict = {"completion_lens": [], "prompt_lens": [], "cpu_s": [], "throughputs": None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            stream = pl_module.engine.group_stream()
            rollouts = stream.last.rollouts if stream is not None and stream.last is not None else []
            AsyncProbe.record["completion_lens"].append([len(r.completion_ids) for r in rollouts])
            AsyncProbe.record["prompt_lens"].append([len(r.prompt_ids) for r in rollouts])
            AsyncProbe.record["cpu_s"].append(tree_cpu_seconds())

        def teardown(self, trainer, pl_module, stage: str) -> None:
            # runs before WeightSyncCallback's teardown (trainer callbacks come first): the pool is still up
            if stage == "fit" and AsyncProbe.out and pl_module.engine.group_stream() is None:
                AsyncProbe.record["throughputs"] = calibrate(trainer, pl_module)

    return AsyncProbe


def calibrate(trainer, pl_module) -> dict:
    """Decode speeds of the pool alone and at the step's full batch, and the cost of one weight push."""
    from qed_lightning.rollout import SamplingConfig
    from qed_lightning.parallel.distributed import iter_full_parameters

    pool = pl_module.engine.engine
    problems = [trainer.train_dataloader.problem_at(n) for n in range(trainer.train_dataloader.batch_size)]
    hp = pl_module.hparams
    sampling = SamplingConfig(hp.temperature, 1.0, -1, hp.max_new_tokens, seeds=tuple(range(len(problems))))
    start = time.perf_counter()
    alone = pool.generate([problems[0].prompt_ids], sampling, n=1)[0]
    seq_rate = len(alone[0].completion_ids) / (time.perf_counter() - start)
    start = time.perf_counter()
    groups = pool.generate([p.prompt_ids for p in problems], sampling, n=hp.group_size)
    full_rate = sum(len(c.completion_ids) for g in groups for c in g) / (time.perf_counter() - start)
    start = time.perf_counter()
    pool.push_weights(iter_full_parameters(pl_module.model), pool.policy_version + 1)
    pool.wait_for_push()
    return {"gen_tokens_per_s": full_rate, "seq_tokens_per_s": seq_rate, "push_s": time.perf_counter() - start,
            "max_seqs_per_device": 256}


def throughputs(record: dict, phases: dict[str, list[float]], judge_latency: list[float], warmup: int) -> dict:
    """The simulator's `Throughputs` fields (plus `lengths` and `prompt_len`) from a run's record and metrics."""
    steps = range(warmup, len(phases["train"]))
    trained = [sum(p + c for p, c in zip(record["prompt_lens"][k], record["completion_lens"][k])) for k in steps]
    out = dict(record["throughputs"] or {})
    out["train_tokens_per_s"] = sum(trained) / sum(phases["train"][k] for k in steps)
    out["judge_latency_s"] = statistics.fmean(x for x in judge_latency if x > 0) if any(judge_latency) else 0.0
    out["lengths"] = [n for k in steps for n in record["completion_lens"][k]]
    out["prompt_len"] = statistics.fmean(n for k in steps for n in record["prompt_lens"][k])
    return out


def write_throughputs(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
