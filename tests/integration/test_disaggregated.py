"""Disaggregated rollouts on one machine: a REAL `vllm serve` (CPU build) process is the rollout pool.

The server is started the way scripts/slurm/vllm_pool.sbatch starts each pool member (processed log-probs, no
generation_config defaults, dev mode and our worker extension for weight reloads). Checked: the sampler log-probs
the pool returns are the trainer's own before and after a weight push; RL steps through `qed-fit` with generation
overlapped with training are exactly one step off-policy, and with `max_lag: 0` every prefetched sample is dropped,
counted and regenerated on-policy; after training, the pool serves the final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qed_lightning.cli import make_cli
from qed_lightning.parallel.distributed import iter_full_parameters
from qed_lightning.rollout import SamplingConfig, VLLMServerEngine
from runs import read_metrics, series
from sampling import T, chat_prompt, trainer_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pool_url(shared_vllm_server):
    """The suite's shared `vllm serve` of the tiny model (conftest, `vllm_server.SharedServer`), started as
    scripts/slurm/vllm_pool.sbatch starts a pool member (on CPU it prefills whole, see VLLMServerEngine). Each test's
    engine resets it to the tiny model's weights when it starts (`reset_on_start`), whatever an earlier test loaded."""
    return shared_vllm_server


def _sample(engine: VLLMServerEngine, prompt: list[int]):
    (completion,) = engine.generate([prompt], SamplingConfig(temperature=T, max_new_tokens=24, seed=7), n=1)[0]
    return completion


def test_pool_logprobs_are_the_trainers_before_and_after_a_weight_push(pool_url, tiny_model_dir, tiny_tokenizer,
                                                                        tmp_path):
    engine = VLLMServerEngine([pool_url, pool_url + "/v1"], sync_dir=str(tmp_path / "sync"))  # the same server twice
    engine.start(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = chat_prompt(tiny_tokenizer)
    before = _sample(engine, prompt)
    torch.testing.assert_close(torch.tensor(before.logprobs), trainer_logprobs(model, prompt, before.completion_ids),
                               atol=1e-4, rtol=0)
    # the second prompt goes to the other URL; same seed, same samples
    groups = engine.generate([prompt, prompt], SamplingConfig(temperature=T, max_new_tokens=24, seeds=(7, 7)))
    assert groups[0][0].completion_ids == groups[1][0].completion_ids == before.completion_ids

    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # one real training update of every weight
    model.train()
    ids = torch.arange(3, 40).unsqueeze(0)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    model.eval()
    engine.load_weights(iter_full_parameters(model))
    engine.set_policy_version(1)
    after = _sample(engine, prompt)
    assert after.policy_version == 1
    # Tolerance 1e-4 as for the colocated engine (measured ~5e-7). Before the tied-lm_head refresh this was 0.55 nats:
    # the server's body followed the push but its output embeddings stayed the old ones.
    torch.testing.assert_close(torch.tensor(after.logprobs), trainer_logprobs(model, prompt, after.completion_ids),
                               atol=1e-4, rtol=0)
    assert (torch.tensor(after.logprobs) - trainer_logprobs(old, prompt, after.completion_ids)).abs().max() > 1e-2
    assert [p.name for p in (tmp_path / "sync").iterdir()] == ["v1"]  # written once, older ones cleaned up
    index = json.loads((tmp_path / "sync" / "v1" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as save_pretrained does
    engine.close()




def _rl_with_pool(tiny_model_dir: Path, root: Path, url: str, max_lag: int) -> list[dict[str, float]]:
    engine = {"class_path": "qed_lightning.rollout.AsyncRollouts", "init_args": {
        "max_lag": max_lag,
        "engine": {"class_path": "qed_lightning.rollout.VLLMServerEngine",
                   "init_args": {"urls": [url], "sync_dir": str(root / "sync")}},
    }}
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3", "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--model.init_args.model_name_or_path", str(tiny_model_dir), "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.max_new_tokens", "24", "--model.init_args.engine", json.dumps(engine),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
    ])
    return read_metrics(root)


def test_rl_overlapped_with_generation_is_one_step_off_policy_and_the_pool_ends_on_the_final_weights(
        pool_url, tiny_model_dir, tiny_tokenizer, tmp_path):
    rows = _rl_with_pool(tiny_model_dir, tmp_path, pool_url, max_lag=1)
    # step 0 generates synchronously; steps 1 and 2 use rollouts generated in the background during the step before,
    # with the weights of one optimizer step earlier
    assert series(rows, "rollout/prefetch_hit") == [0.0, 1.0, 1.0]
    assert series(rows, "rollout/policy_lag_max") == [0.0, 1.0, 1.0]
    assert series(rows, "rollout/stale_dropped") == [0.0, 0.0, 0.0]
    assert series(rows, "rollout/policy_version") == [1.0, 2.0, 3.0]
    # off-policy by one step: the trainer's log-probs differ from the sampler's, which the ratio rho corrects
    diffs = series(rows, "rollout/logprob_diff_max")
    assert diffs[0] < 1e-3 and min(diffs[1:]) > 1e-3, diffs
    # the pool now serves the final (exported) weights
    engine = VLLMServerEngine([pool_url], sync_dir=str(tmp_path / "probe"), reset_on_start=False)
    engine.start()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = chat_prompt(tiny_tokenizer)
    sample = _sample(engine, prompt)
    torch.testing.assert_close(torch.tensor(sample.logprobs), trainer_logprobs(final, prompt, sample.completion_ids),
                               atol=1e-4, rtol=0)
    engine.close()


def test_samples_beyond_max_lag_are_dropped_counted_and_regenerated_on_policy(pool_url, tiny_model_dir, tmp_path):
    rows = _rl_with_pool(tiny_model_dir, tmp_path, pool_url, max_lag=0)
    # every prefetched sample is one step old: 4 prompts x G=4 dropped at steps 1 and 2, regenerated with the
    # current weights (the pool was reset to the initial weights at start, so step 0 is on-policy too)
    assert series(rows, "rollout/stale_dropped") == [0.0, 16.0, 16.0]
    assert series(rows, "rollout/policy_lag_max") == [0.0, 0.0, 0.0]
    assert max(series(rows, "rollout/logprob_diff_max")) < 1e-3
