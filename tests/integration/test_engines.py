"""Rollout engines against the trainer's own forward pass: same log-prob convention, real weight sync."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from qed_lightning.parallel.distributed import iter_full_parameters

from qed_lightning.rollout import HFEngine, SamplingConfig, VLLMEngine
from sampling import T, chat_prompt, trainer_logprobs



def _perturb(model) -> None:
    """One SGD step on a next-token loss: a real training update of every weight."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.arange(3, 40).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    engine = VLLMEngine(model=str(tiny_model_dir), max_model_len=1024, seed=0)
    engine.start()
    yield engine
    engine.close()


@pytest.mark.slow
def test_vllm_logprobs_match_trainer_and_follow_weight_sync(vllm_engine, tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = chat_prompt(tiny_tokenizer)
    sampling = SamplingConfig(temperature=T, max_new_tokens=24, seed=7)

    (before,) = vllm_engine.generate([prompt], sampling, n=1)[0]
    assert len(before.completion_ids) == len(before.logprobs) > 0
    torch.testing.assert_close(torch.tensor(before.logprobs), trainer_logprobs(model, prompt, before.completion_ids),
                               atol=1e-4, rtol=0)

    old_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.train()
    _perturb(model)
    model.eval()
    vllm_engine.load_weights(iter_full_parameters(model))
    vllm_engine.set_policy_version(1)

    (after,) = vllm_engine.generate([prompt], sampling, n=1)[0]
    assert after.policy_version == 1
    new_lp = trainer_logprobs(model, prompt, after.completion_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), new_lp, atol=1e-4, rtol=0)
    old_lp = trainer_logprobs(old_model, prompt, after.completion_ids)
    # the engine no longer samples from the old weights
    assert (torch.tensor(after.logprobs) - old_lp).abs().max() > 1e-2


@pytest.mark.slow
def test_vllm_groups_finish_reasons_and_seeds(vllm_engine, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer)
    groups = vllm_engine.generate([prompt, prompt[:-3]], SamplingConfig(temperature=1.0, max_new_tokens=6, seed=1), n=3)
    assert [len(g) for g in groups] == [3, 3]
    for c in groups[0] + groups[1]:
        assert c.finish_reason in {"stop", "length"}
        assert c.finish_reason == "stop" or len(c.completion_ids) == 6
    again = vllm_engine.generate([prompt, prompt[:-3]], SamplingConfig(temperature=1.0, max_new_tokens=6, seed=1), n=3)
    assert [c.completion_ids for g in again for c in g] == [c.completion_ids for g in groups for c in g]
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_engine.generate([[1] * 2000], SamplingConfig(max_new_tokens=4))


@pytest.mark.slow
def test_vllm_seeded_prefills_over_the_token_budget(vllm_engine):
    """48 seeded requests of 100 prompt tokens: 4,800 prefill tokens, more than vLLM's CPU budget of 4,096 per
    step. With chunked prefill (vLLM's default) the last request was prefilled in part and its seeded generator
    rewound with an offset that CPU generators lack ("CPU Generator does not use offset"); the engine now schedules
    prefills whole. Sampling stays reproducible."""
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 500) for _ in range(100)] for _ in range(6)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=2, seeds=tuple(range(6)))
    groups = vllm_engine.generate(prompts, sampling, n=8)
    assert [len(g) for g in groups] == [8] * 6
    assert all(c.completion_ids for g in groups for c in g)
    again = vllm_engine.generate(prompts, sampling, n=8)
    assert [c.completion_ids for g in again for c in g] == [c.completion_ids for g in groups for c in g]


def test_hf_engine_logprobs_match_trainer(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine()
    engine.attach(model, tiny_tokenizer)
    prompt = chat_prompt(tiny_tokenizer)
    groups = engine.generate([prompt, prompt[2:]], SamplingConfig(temperature=T, max_new_tokens=12, seed=3), n=2)
    assert [len(g) for g in groups] == [2, 2]
    model.eval()
    for group, p in zip(groups, [prompt, prompt[2:]]):
        for c in group:
            assert c.finish_reason == "stop" or len(c.completion_ids) == 12
            torch.testing.assert_close(torch.tensor(c.logprobs), trainer_logprobs(model, p, c.completion_ids),
                                       atol=1e-4, rtol=0)
