"""Measurements 1, 2, 3, 6 and 7 of the GPU check (see the package docstring) at a `Scale`, each run in a process of
its own by `scripts/gpu_check.py` (`python -m qed_lightning.gpu_check.measure SECTION --device D --out X.json`), so a
section past its time budget can be cut without losing the others.

Every measurement goes through the training code itself (`SFTModule.lm_loss`, `RubricRLModule.compute_loss` and
`PolicyUpdate.token_stats`) on a random-weight Qwen3 built from its config (nothing downloaded), with fp32 weights and
bf16 autocast, i.e. the paper configs' precision. Attention is sdpa (flash-attn is not on the GPU machine): a packed SFT
row costs sdpa a dense block-diagonal mask, so the paper-scale memory uses single-sequence rows (causal, no mask),
which is what varlen flash attention holds per sequence. Section 7 (`flash_attention`) runs `flash_attention_2`
when `flash_attn` imports, against sdpa on the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field

import torch

from qed_lightning.data.chat import IGNORE_INDEX

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, vocab_size=512)


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the check: `GPU` (the real one) or `CPU` (`--dry-run`: the same code, tiny shapes)."""

    device: str
    gemm_n: int
    sft_shape: dict
    sft_rows: tuple[int, ...]
    doc_tokens: tuple[int, int]  # packed documents' length range
    paper_shape: dict
    paper_layers: tuple[int, int]
    sft_row: int
    rl_tokens: int
    rl_shape: dict  # measurements 4-5 (Trainer + strategies)
    rl_completions: tuple[int, int]
    steps: int = 3
    chunk: int = 1024
    prompt_tokens: int = 256
    gap_sequences: int = 4
    flash_row: int = 4096  # section 7's packed row
    #: seconds per section (the whole run's time: `cap`, a little more than their sum for starting and saving);
    #: "strategies" holds the model's saving and `strategy_budgets`, one subprocess per strategy
    budgets: dict = field(default_factory=dict)
    strategy_budgets: dict = field(default_factory=dict)
    cap: float = 480.0
    extra: dict = field(default_factory=dict)


#: On one H100 (not yet measured there: estimates from the work each does; a process's start, imports included, is
#: ~10 s of each): 440 s of a 455 s cap (the script's start, ~10 s, comes out of the spare 15 s), which
#: `scripts/gpu_check.sh` backs with `timeout 470`.
GPU_STRATEGY_BUDGETS = {"none": 40, "fsdp2": 45, "zero2": 45, "zero3": 55, "pure_bf16": 30}
GPU_BUDGETS = {"gemm": 20, "sft": 60, "memory": 60, "strategies": 15 + sum(GPU_STRATEGY_BUDGETS.values()),
               "logprob_gap": 30, "flash_attn": 40}
GPU = Scale("cuda", 8192, QWEN3_06B, (16384, 32768), (1024, 8192), QWEN3_4B, (2, 4), 32768, 65536,
            {**QWEN3_06B, "num_hidden_layers": 4}, (256, 1024), budgets=GPU_BUDGETS,
            strategy_budgets=GPU_STRATEGY_BUDGETS, cap=455.0)
#: The dry run on a shared 2-core CPU (measured ~2.5 min in all; ZeRO-2's process ~70 s): 2-3x that per part.
CPU_STRATEGY_BUDGETS = {"none": 60, "fsdp2": 60, "zero2": 150, "zero3": 90, "pure_bf16": 60}
CPU_BUDGETS = {"gemm": 30, "sft": 45, "memory": 45, "strategies": 30 + sum(CPU_STRATEGY_BUDGETS.values()),
               "logprob_gap": 45, "flash_attn": 30}
CPU = Scale("cpu", 256, TINY, (256, 512), (32, 128), {**TINY, "num_hidden_layers": 4}, (1, 2), 512, 512,
            TINY, (8, 24), steps=1, chunk=64, prompt_tokens=16, gap_sequences=2, flash_row=384,
            budgets=CPU_BUDGETS, strategy_budgets=CPU_STRATEGY_BUDGETS, cap=700.0)


def qwen3(shape: dict, device: str, layers: int | None = None, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """A random-weight Qwen3ForCausalLM (fp32, tied embeddings as Qwen3-0.6B/4B), built on `device` (the same
    weights for the same `seed`, whatever the attention backend `attn`)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**shape, **({"num_hidden_layers": layers} if layers else {})}, tie_word_embeddings=True,
                         max_position_embeddings=131072, use_cache=False, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM(config).float()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def gemm(scale: Scale) -> dict:
    """bf16 matmul TFLOP/s at n^3 (2 n^3 flops each), median of 3 timings of 10."""
    n = scale.gemm_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=scale.device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=scale.device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(3):
        _sync(scale.device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(scale.device)
        times.append((time.perf_counter() - start) / 10)
    return {"n": n, "tflops": 2 * n**3 / sorted(times)[1] / 1e12}


def packed_row(length: int, vocab: int, docs: tuple[int, int], seed: int = 0) -> tuple[dict, list[int]]:
    """One packed SFT row `[1, length]` of random documents (lengths drawn from `docs`), every token labelled but
    each document's first (as `data.packing` lays out a row); and the documents' lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < length:
        lengths.append(min(int(torch.randint(docs[0], docs[1] + 1, (1,), generator=gen)), length - sum(lengths)))
    ids = torch.randint(3, vocab, (1, length), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.masked_fill(pos == 0, IGNORE_INDEX)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}, lengths


def model_flops(shape: dict, docs: list[int]) -> float:
    """Forward + backward FLOPs of one step on documents `docs` (no recompute counted): 6 x matmul parameters per
    token (decoder and LM head), plus causal attention 6 x l^2 x heads x head_dim per layer and document."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv, d = shape["num_key_value_heads"], shape["head_dim"]
    per_layer = h * d * (2 * heads + 2 * kv) + 3 * h * shape["intermediate_size"]
    matmul = shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * h
    attention = shape["num_hidden_layers"] * sum(6 * n * n * heads * d for n in docs)
    return 6 * matmul * sum(docs) + attention


def _sft_module(model: torch.nn.Module, chunk: int):
    from qed_lightning.modules import SFTModule

    module = SFTModule("random-weights", loss_chunk_tokens=chunk, gradient_checkpointing=True)
    module.model = model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return module.to(next(model.parameters()).device)  # the module's `device` follows the model


def _sft_steps(module, batch: dict, opt, steps: int, device: str) -> float:
    """Seconds per SFT step (bf16 autocast on fp32 weights, AdamW), after one warm-up step."""
    for step in range(steps + 1):
        if step == 1:
            _sync(device)
            _reset_peak(device)
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss_sum, n = module.lm_loss(batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / steps


def sft(scale: Scale, gemm_tflops: float) -> list[dict]:
    """Tokens/s, MFU (model FLOPs / the measured GEMM rate) and peak memory per row length, chunked vs full logits."""
    model = qwen3(scale.sft_shape, scale.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if scale.device == "cuda" else {}))
    results = []
    for length in scale.sft_rows:
        batch, docs = packed_row(length, scale.sft_shape["vocab_size"], scale.doc_tokens)
        batch = {k: v.to(scale.device) for k, v in batch.items()}
        for chunk in (scale.chunk, 0):
            row = {"row_tokens": length, "documents": len(docs), "loss_chunk_tokens": chunk}
            try:
                seconds = _sft_steps(_sft_module(model, chunk), batch, opt, scale.steps, scale.device)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                results.append({**row, "oom": True})
                continue
            flops = model_flops(scale.sft_shape, docs)
            results.append({**row, "step_s": seconds, "tokens_per_s": length / seconds,
                            "mfu": flops / seconds / (gemm_tflops * 1e12), "peak_gib": _peak_gib(scale.device)})
    del model, opt
    return results


def rl_module(model: torch.nn.Module | None, chunk: int, checkpointing: bool, **kwargs):
    """A `RubricRLModule` around `model` (None: loaded by Lightning), with a no-op engine and no judge."""
    from qed_lightning.gpu_check.rl_step import NullEngine, _NoJudge
    from qed_lightning.modules import RubricRLModule

    path = kwargs.pop("model_name_or_path", "random-weights")
    kwargs.setdefault("rollout_log", "off")
    module = RubricRLModule(path, engine=NullEngine(), judge=_NoJudge(), logits_chunk_tokens=chunk,
                            gradient_checkpointing=checkpointing, **kwargs)
    if model is not None:
        module.model = model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = module.to(next(model.parameters()).device)
    return module


def _paper_peak(scale: Scale, layers: int) -> dict:
    from qed_lightning.rollout.base import Completion

    out = {}
    model = qwen3(scale.paper_shape, scale.device, layers=layers)
    batch, _ = packed_row(scale.sft_row, scale.paper_shape["vocab_size"], (scale.sft_row, scale.sft_row))
    batch = {k: v.to(scale.device) for k, v in batch.items()}
    sft_module = _sft_module(model, scale.chunk)
    _reset_peak(scale.device)
    with torch.autocast(scale.device, dtype=torch.bfloat16):
        loss_sum, n = sft_module.lm_loss(batch)
    (loss_sum / n).backward()
    out["sft_peak_gib"] = _peak_gib(scale.device)
    model.zero_grad(set_to_none=True)
    completion = scale.rl_tokens - scale.prompt_tokens * 4
    ids = torch.randint(3, scale.paper_shape["vocab_size"], (scale.rl_tokens,)).tolist()
    rollout = Completion(ids[: scale.rl_tokens - completion], ids[-completion:], [-11.9] * completion, "stop", "")
    module = rl_module(model, scale.chunk, checkpointing=True)
    totals = {"sequences": 1, "tokens": completion, "max_len": completion}
    _reset_peak(scale.device)
    with torch.autocast(scale.device, dtype=torch.bfloat16):
        loss, _ = module.compute_loss([rollout], torch.ones(1), [0], totals)
    loss.backward()
    out["rl_peak_gib"] = _peak_gib(scale.device)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    del model, module, sft_module
    return out


def memory(scale: Scale) -> dict:
    """Peak memory of a 32k SFT row and a 65,536-token RL micro-batch (forward + backward, fp32 weights and
    gradients, bf16 compute, gradient checkpointing, chunked LM head) at two depths, extrapolated linearly in the
    layer count to the full model; AdamW's two fp32 moments (8 bytes per parameter) are added for the full model."""
    low, high = scale.paper_layers
    runs = {layers: _paper_peak(scale, layers) for layers in (low, high)}
    target = scale.paper_shape["num_hidden_layers"]
    out = {"layers_measured": [low, high], "layers_target": target, "runs": {str(k): v for k, v in runs.items()}}
    per_layer_params = (runs[high]["parameters"] - runs[low]["parameters"]) / (high - low)
    params = runs[low]["parameters"] + per_layer_params * (target - low)
    out["parameters_target"] = params
    out["adamw_states_gib_target"] = 8 * params / 2**30
    for key in ("sft_peak_gib", "rl_peak_gib"):
        a, b = runs[low][key], runs[high][key]
        if a is not None and b is not None:
            out[key.replace("_gib", "_gib_target")] = a + (b - a) / (high - low) * (target - low)
    return out


def logprob_gap(scale: Scale) -> dict:
    """|trainer - bf16 HF forward| log-probs of the same completion tokens (and |trainer - fp32| for scale)."""
    from qed_lightning.rollout.base import Completion

    model = qwen3(scale.sft_shape, scale.device).eval()
    vocab, gen = scale.sft_shape["vocab_size"], torch.Generator().manual_seed(1)
    rollouts = []
    for _ in range(scale.gap_sequences):
        length = int(torch.randint(scale.rl_completions[0], scale.rl_completions[1] + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (scale.prompt_tokens + length,), generator=gen).tolist()
        rollouts.append(Completion(ids[: scale.prompt_tokens], ids[scale.prompt_tokens:], [0.0] * length, "stop", ""))
    module = rl_module(model, scale.chunk, checkpointing=False, temperature=0.8, micro_batch_layout="padded")
    members = list(range(len(rollouts)))
    with torch.no_grad():
        with torch.autocast(scale.device, dtype=torch.bfloat16):
            trainer, _, mask = module.policy_update.token_stats(rollouts, members)
        exact = module.policy_update.token_stats(rollouts, members)[0]
        half = copy.deepcopy(model).to(torch.bfloat16)
        sampler = torch.zeros_like(trainer)
        for row, r in enumerate(rollouts):
            ids = torch.tensor([r.prompt_ids + r.completion_ids], device=scale.device)
            logits = half(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.8
            sampler[row, : len(r.completion_ids)] = logits.log_softmax(-1).gather(
                -1, ids[0, len(r.prompt_ids):, None])[:, 0]
    real = mask.bool()
    gap, drift = (trainer - sampler).abs()[real], (trainer - exact).abs()[real]
    return {"tokens": int(real.sum()),
            "trainer_vs_bf16_hf_mean": float(gap.mean()), "trainer_vs_bf16_hf_max": float(gap.max()),
            "trainer_vs_fp32_mean": float(drift.mean()), "trainer_vs_fp32_max": float(drift.max()),
            "mean_logprob": float(trainer[real].mean()), "uniform_logprob": -math.log(vocab)}


def flash_unavailable(device: str) -> str | None:
    """Why `flash_attention_2` cannot run here (None when it can)."""
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # an ImportError, or a wheel built for another torch/CUDA
        return f"flash_attn does not import: {type(error).__name__}: {error}"
    if device != "cuda":
        return "flash_attention_2 needs a CUDA device"
    return None


def flash_attention(scale: Scale, attn: str = "flash_attention_2") -> dict:
    """Backend `attn` (the paper configs' flash_attention_2) against sdpa on the same weights: one packed SFT row
    (`SFTModule.lm_loss`, bf16 autocast on fp32 weights, chunked LM head) forward + backward under each (seconds,
    peak memory, loss, gradients' relative difference), and the packed row's logits under `attn` against each
    document run alone under sdpa (what packing must not change). `attn="sdpa"` runs the same path on CPU."""
    if attn == "flash_attention_2" and (reason := flash_unavailable(scale.device)):
        return {"skipped": reason}
    batch, docs = packed_row(scale.flash_row, scale.sft_shape["vocab_size"], scale.doc_tokens, seed=2)
    batch = {k: v.to(scale.device) for k, v in batch.items()}
    out: dict = {"implementation": attn, "row_tokens": scale.flash_row, "documents": len(docs), "runs": {}}
    grads, logits = {}, {}
    for name in (attn, "sdpa") if attn != "sdpa" else ("sdpa",):
        model = qwen3(scale.sft_shape, scale.device, attn=name)
        module = _sft_module(model, scale.chunk)
        _sync(scale.device)
        _reset_peak(scale.device)
        start = time.perf_counter()
        with torch.autocast(scale.device, dtype=torch.bfloat16):
            loss_sum, n = module.lm_loss(batch)
        (loss_sum / n).backward()
        _sync(scale.device)
        out["runs"][name] = {"fwd_bwd_s": time.perf_counter() - start, "peak_gib": _peak_gib(scale.device),
                             "loss": float(loss_sum.detach() / n)}
        grads[name] = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), torch.autocast(scale.device, dtype=torch.bfloat16):
            logits[name] = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
            if name == "sdpa":  # each document alone: no packing at all
                alone, at = [], 0
                for length in docs:
                    ids = batch["input_ids"][:, at : at + length]
                    alone.append(model(input_ids=ids).logits[0].float())
                    at += length
                logits["alone"] = torch.cat(alone)
        del model, module
    gap = (logits[attn] - logits["alone"]).abs()
    out.update(logits_gap_vs_sdpa_alone_mean=float(gap.mean()), logits_gap_vs_sdpa_alone_max=float(gap.max()))
    if attn != "sdpa":
        same = (logits["sdpa"] - logits["alone"]).abs()
        out.update(sdpa_packed_gap_mean=float(same.mean()), sdpa_packed_gap_max=float(same.max()),
                   grad_rel_diff_vs_sdpa=float((grads[attn] - grads["sdpa"]).norm() / grads["sdpa"].norm()))
    return out


SECTIONS = {"gemm": gemm, "sft": sft, "memory": memory, "logprob_gap": logprob_gap, "flash_attn": flash_attention}


def main(argv: list[str] | None = None) -> None:
    """One section in this process, its result written as JSON (`scripts/gpu_check.py` runs one process per
    section, each with a time budget)."""
    parser = argparse.ArgumentParser(description="GPU check, one in-process measurement")
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gemm-tflops", type=float, help="sft: the MFU denominator (measured here when not given)")
    args = parser.parse_args(argv)
    scale = GPU if args.device == "cuda" else CPU
    if args.section == "sft":
        result = sft(scale, args.gemm_tflops or gemm(scale)["tflops"])
    else:
        result = SECTIONS[args.section](scale)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
