"""What the rollout-engine tests share: a chat prompt, and the trainer's own log-probs of a sampled completion."""

from __future__ import annotations

import torch

from qed_lightning.model.forward import token_logprobs

T = 0.8  # the sampling temperature of these tests; the trainer's log-probs use the same


def chat_prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Prove that 2 is prime."}],
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The model's log-probs (at temperature `T`) of each completion token after `prompt`, in one forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return token_logprobs(logits, ids[:, 1:], temperature=T)[0][len(prompt) - 1:]
