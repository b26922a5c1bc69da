"""The model layer: everything that runs the transformer, between the stage modules and the pure `rl/` math.

- `forward.py`: the RL and SFT forward (completion logits / hidden states for each micro-batch layout), the chunked
  LM head, and per-token log-probs and entropies computed block by block (`token_logprobs`, `entropy_from_logits`);
- `attention.py`: varlen (flash-style) attention detection and sequence boundaries;
- `precision.py`: fp32 masters, bf16 compute, FSDP2's mixed-precision policy;
- `optim.py`: the warmup + cosine LR schedule.
"""
