"""AsyncRollouts with a scripted engine: overlap, lag accounting, stale drops; VLLMServerEngine's wire format."""

from __future__ import annotations

import json
import time

import pytest
import torch

from qed_lightning.rollout import AsyncRollouts, Completion, HFEngine, RolloutEngine, SamplingConfig, VLLMServerEngine
from qed_lightning.rollout.engines.server_pool import CompletionsAPI
from qed_lightning.rollout.pool_sync import write_safetensors

DELAY = 0.4  # seconds one generate call of the fake engine takes (sleeping: no CPU needed, robust on a busy machine)


class SlowEngine(RolloutEngine):
    """Returns one completion per sample, tagged with the engine's policy version; each call sleeps DELAY seconds."""

    def __init__(self) -> None:
        self.policy_version = 0
        self.calls: list[tuple[list[list[int]], int]] = []
        self.loads = 0

    def generate(self, prompts, sampling, n=1):
        version = self.policy_version  # the weights a call starts with are the ones it samples from
        self.calls.append((prompts, n))
        time.sleep(DELAY)
        return [[Completion(list(p), [7], [-0.5], "stop", "x", version) for _ in range(n)] for p in prompts]

    def load_weights(self, named_tensors):
        self.loads += 1


def _step(wrapper: AsyncRollouts, engine: SlowEngine, step: int) -> None:
    """What the trainer does after generating: grade/train (DELAY + a margin), then push weights (version = step)."""
    time.sleep(DELAY * 1.5)
    wrapper.load_weights([])
    wrapper.set_policy_version(step)


A, B, C = [[1, 2]], [[3, 4], [5]], [[6]]
SAMPLING = SamplingConfig(max_new_tokens=4, seeds=(11,))
SAMPLING2 = SamplingConfig(max_new_tokens=4, seeds=(12, 13))


def test_next_step_is_generated_while_the_trainer_steps_and_is_one_step_old():
    engine = SlowEngine()
    wrapper = AsyncRollouts(engine, max_lag=1)
    wrapper.trainer_step = 0
    wrapper.schedule_next(B, SAMPLING2, 2)
    first = wrapper.generate(A, SAMPLING, 2)  # synchronous (nothing prefetched); starts B in the background
    assert [c.policy_version for c in first[0]] == [0, 0]
    _step(wrapper, engine, 1)  # B generates during this "training" time, with the version-0 weights
    wrapper.trainer_step = 1
    started = time.perf_counter()
    second = wrapper.generate(B, SAMPLING2, 2)
    waited = time.perf_counter() - started
    metrics = wrapper.pop_metrics()
    assert waited < DELAY / 2, waited  # it was ready: generation overlapped the step
    assert metrics["rollout/prefetch_hit"] == 1.0 and metrics["rollout/stale_dropped"] == 0.0
    assert [c.policy_version for g in second for c in g] == [0, 0, 0, 0]  # one step off-policy, within max_lag=1
    assert len(engine.calls) == 2  # A, then B once: no regeneration
    wrapper.close()


def test_samples_older_than_max_lag_are_dropped_counted_and_regenerated():
    engine = SlowEngine()
    wrapper = AsyncRollouts(engine, max_lag=0)
    wrapper.trainer_step = 0
    wrapper.schedule_next(B, SAMPLING2, 2)
    wrapper.generate(A, SAMPLING, 2)
    _step(wrapper, engine, 1)
    wrapper.trainer_step = 1
    second = wrapper.generate(B, SAMPLING2, 2)
    metrics = wrapper.pop_metrics()
    assert metrics["rollout/stale_dropped"] == 4.0  # 2 prompts x 2 samples, generated with version 0 at step 1
    assert [c.policy_version for g in second for c in g] == [1, 1, 1, 1]  # regenerated on-policy
    assert engine.calls[-1] == (B, 2)
    wrapper.close()


def test_a_generation_slower_than_the_trainer_is_waited_for_and_lags_by_the_steps_missed():
    """The trainer jumps two versions (e.g. sync_interval 2, or a resumed run): samples of version 0 at step 2 are
    two steps old, beyond max_lag=1, so they are dropped, and only the stale prompt is regenerated."""
    engine = SlowEngine()
    wrapper = AsyncRollouts(engine, max_lag=1)
    wrapper.trainer_step = 0
    wrapper.schedule_next(B, SAMPLING2, 1)
    wrapper.generate(A, SAMPLING, 1)
    started = time.perf_counter()
    wrapper.load_weights([])  # the in-flight B is waited for before the new weights go in
    assert time.perf_counter() - started > DELAY / 2
    assert engine.loads == 1 and len(engine.calls) == 2
    wrapper.set_policy_version(2)
    wrapper.trainer_step = 2
    groups = wrapper.generate(B, SAMPLING2, 1)
    assert wrapper.pop_metrics()["rollout/stale_dropped"] == 2.0
    assert [g[0].policy_version for g in groups] == [2, 2]
    wrapper.close()


def test_other_requests_are_served_after_the_prefetch_and_leave_it_in_place():
    engine = SlowEngine()
    wrapper = AsyncRollouts(engine, max_lag=1)
    wrapper.trainer_step = 0
    wrapper.schedule_next(B, SAMPLING2, 2)
    wrapper.generate(A, SAMPLING, 2)
    wrapper.generate(C, SAMPLING, 1)  # e.g. validation: not the prefetched request
    assert wrapper.pop_metrics()["rollout/prefetch_hit"] == 0.0
    wrapper.generate(B, SAMPLING2, 2)
    assert wrapper.pop_metrics()["rollout/prefetch_hit"] == 1.0
    assert [c[0] for c in engine.calls] == [A, B, C]  # B ran once, before C
    wrapper.close()


def test_overlap_refuses_a_generator_that_is_the_trained_policy():
    with pytest.raises(ValueError, match="HFEngine"):
        AsyncRollouts(HFEngine(), max_lag=1).attach(torch.nn.Linear(1, 1), None)
    AsyncRollouts(HFEngine(), overlap=False).attach(torch.nn.Linear(1, 1), None)  # lag bound only: fine


def test_server_request_pins_every_sampling_knob_and_parses_token_ids():
    engine = VLLMServerEngine(["http://a:8000/v1", "http://b:8000"], model="m", sync_dir="/tmp/x")
    assert engine.urls == ["http://a:8000", "http://b:8000"]
    body = engine.servers.request_body([1, 2], SamplingConfig(temperature=0.8, max_new_tokens=5), n=4, seed=9)
    assert body["model"] == "m" and body["prompt"] == [1, 2] and body["n"] == 4 and body["seed"] == 9
    assert body["logprobs"] == 0
    assert body["top_k"] == -1 and body["top_p"] == 1.0 and body["min_p"] == 0.0  # no generation_config defaults
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"]
    choice = {"index": 0, "text": "ab", "finish_reason": "length",
              "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.1, -0.2]}}
    c = CompletionsAPI.parse([1, 2], choice, version=3)
    assert (c.completion_ids, c.logprobs, c.truncated, c.policy_version) == ([5, 6], [-0.1, -0.2], True, 3)
    with pytest.raises(ValueError, match="sync_dir"):
        VLLMServerEngine(["http://a:8000"])


def test_checkpoint_sync_streams_small_shards_with_an_index(tmp_path):
    from safetensors.torch import load_file

    tensors = [(f"w{i}", torch.full((256,), float(i))) for i in range(5)]  # 1 KiB each
    total = write_safetensors(iter(tensors), tmp_path, shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert total == 5 * 1024 and index["metadata"]["total_size"] == total
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001.safetensors", "model-00002.safetensors", "model-00003.safetensors"]
    for name, tensor in tensors:
        assert torch.equal(load_file(str(tmp_path / index["weight_map"][name]))[name], tensor)
    assert write_safetensors(iter(tensors), None) == 0  # other ranks only walk the parameters


def test_pushes_are_written_in_the_servers_dtype(tmp_path):
    """fp32 master weights pushed to a bf16 server are cast at write time: half the bytes; integer buffers keep
    their dtype. The same cast feeds the NCCL sender's metadata and tensors."""
    from safetensors.torch import load_file

    from qed_lightning.rollout.pool_sync import full_parameter_meta

    tensors = [("w", torch.randn(256)), ("steps", torch.arange(4))]
    total = write_safetensors(iter(tensors), tmp_path, dtype=torch.bfloat16)
    saved = load_file(str(tmp_path / "model-00001.safetensors"))
    assert (saved["w"].dtype, saved["steps"].dtype, total) == (torch.bfloat16, torch.int64, 256 * 2 + 4 * 8)
    torch.testing.assert_close(saved["w"], tensors[0][1].to(torch.bfloat16))
    model = torch.nn.Linear(3, 2)
    assert [m[1] for m in full_parameter_meta(model, torch.bfloat16)] == [torch.bfloat16, torch.bfloat16]
    assert [m[1] for m in full_parameter_meta(model)] == [torch.float32, torch.float32]


def test_pool_urls_from_a_list_the_environment_or_the_pool_file(tmp_path, monkeypatch):
    from qed_lightning.rollout.engines.server_engine import resolve_urls

    (tmp_path / "urls.txt").write_text("http://n1:8000\nhttp://n1:8001/v1\n\n")
    monkeypatch.setenv("POOL", "http://n2:8000,http://n2:8001")
    assert resolve_urls([f"file:{tmp_path / 'urls.txt'}", "env:POOL", "http://n3:9000/"]) == [
        "http://n1:8000", "http://n1:8001", "http://n2:8000", "http://n2:8001", "http://n3:9000"]
    with pytest.raises(ValueError, match="MISSING"):
        resolve_urls(["env:MISSING"])
    engine = VLLMServerEngine(["env:POOL"], sync_dir=str(tmp_path))
    assert engine.urls == []  # resolved when training starts (the pool may still be coming up)


def test_a_dead_engine_fails_the_wait_for_rollouts_within_liveness_s():
    """AsyncRollouts waits for its background generation with a liveness check (issue 19): a generator whose server
    died is reported by the engine's `check_alive` while the request itself would still be waiting."""
    import threading

    release = threading.Event()

    class Hung(SlowEngine):
        def generate(self, prompts, sampling, n=1):
            release.wait(30)
            return super().generate(prompts, sampling, n)

        def check_alive(self, stalled_s=None):
            raise RuntimeError("vLLM server http://127.0.0.1:1 (log x.log) is gone (weight version 0)")

    wrapper = AsyncRollouts(Hung(), max_lag=1, liveness_s=0.2)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="is gone"):
        wrapper.generate([[1, 2]], SamplingConfig(), 1)
    assert time.monotonic() - started < 3.0
    release.set()
    wrapper.close()
