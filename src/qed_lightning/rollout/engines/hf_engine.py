"""A transformers `generate` engine: the fallback where vLLM is absent, and the reference the vLLM engine is checked
against.

By default it shares the policy module itself (`attach`), so there is nothing to sync and no second copy in memory:
generation runs under `torch.no_grad()` in eval mode, then the module goes back to train mode. Sampler log-probs are
the log-softmax of the *processed* scores that `generate` samples from (temperature applied), the same convention
as the vLLM engine and the trainer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig


class HFEngine(RolloutEngine):
    """Batched `model.generate` on the policy (shared) or on a separately loaded copy.

    Args:
        model: model folder or hub id for a separate copy; None = share the policy module (no sync needed).
        batch_size: sequences generated per `generate` call.
        dtype: dtype of a separately loaded copy.
    """

    def __init__(self, model: str | None = None, batch_size: int = 64, dtype: str = "float32") -> None:
        self.model_path = model
        self.batch_size = batch_size
        self.dtype = dtype
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.policy_version = 0
        self._start_model: str | None = None

    @property
    def shares_policy(self) -> bool:
        """No `model` of its own: the engine generates with the attached policy (a copy of `start`'s model
        when there is no policy, as in `qed-eval`)."""
        return self.model_path is None

    def start(self, model: str | None = None) -> None:
        """Without a policy to share (`qed-eval`), `attach(None, ...)` loads `model` as the separate copy."""
        self._start_model = model

    def attach(self, policy: torch.nn.Module | None, tokenizer) -> None:
        """Use the trainer's policy (shared mode) or load the separate copy, and the tokenizer for decoding."""
        self.tokenizer = tokenizer
        if self.shares_policy and policy is not None:
            self.model = policy
        elif self.model is None:
            from transformers import AutoModelForCausalLM

            path = self.model_path or self._start_model
            if path is None:
                raise ValueError("HFEngine has no model to load: set engine `model`, or attach a policy to share")
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype))

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids.add(self.tokenizer.eos_token_id)
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_ids()[0]
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p):] = torch.tensor(p, device=device)
            attention[i, width - len(p):] = 1
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else None,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=self._eos_ids(), pad_token_id=pad,
            output_scores=True, return_dict_in_generate=True, use_cache=True,
        )
        new = out.sequences[:, width:]  # [B, T]
        logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [B, T, V], processed scores
        token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B, T]
        return [self._completion(p, new[i].tolist(), token_lp[i].tolist()) for i, p in enumerate(prompts)]

    def _completion(self, prompt: list[int], ids: list[int], lps: list[float]) -> Completion:
        eos = set(self._eos_ids())
        end = next((j + 1 for j, t in enumerate(ids) if t in eos), None)
        finish = "stop" if end is not None else "length"
        ids, lps = (ids[:end], lps[:end]) if end is not None else (ids, lps)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(list(prompt), ids, lps, finish, text, self.policy_version)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        if self.model is None:
            raise RuntimeError("HFEngine.attach(policy, tokenizer) must be called before generate")
        seeded = bool(prompts) and sampling.prompt_seed(0) is not None
        # Seeded: each prompt's n samples in their own calls, from their own seed, so a prompt gets the same samples
        # whichever rank or batch it lands on (as vLLM's per-request seeds); unseeded: one batched pass.
        calls = [[i] for i in range(len(prompts))] if seeded else [list(range(len(prompts)))]
        was_training = self.model.training
        self.model.eval()
        try:
            done: list[Completion] = []
            for call in calls:
                if seeded:
                    torch.manual_seed(sampling.prompt_seed(call[0]))
                flat = [prompts[i] for i in call for _ in range(n)]
                for start in range(0, len(flat), self.batch_size):
                    batch = self._generate_batch(flat[start:start + self.batch_size], sampling)
                    done.extend(batch)
                    if self.progress is not None:
                        self.progress(len(batch), sum(len(c.completion_ids) for c in batch))
        finally:
            self.model.train(was_training)
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if self.shares_policy:
            return  # the engine *is* the policy
        state = dict(named_tensors)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"HFEngine.load_weights: unexpected parameter names {unexpected[:5]}")
