"""The model layer: everything that runs the transformer, between the stage modules and the pure `rl/` math.

- `forward.py`: the RL forward (completion logits / hidden states for each micro-batch layout);
- `model/forward.py`: final hidden states and the chunked LM head (log-probs, entropies, SFT loss without full logits);
- `attention.py`: varlen (flash-style) attention detection and sequence boundaries;
- `precision.py`: fp32 masters, bf16 compute, FSDP2's mixed-precision policy;
- `optim.py`: the warmup + cosine LR schedule.
"""
