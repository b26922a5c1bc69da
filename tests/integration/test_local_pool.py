"""LocalVLLMPool on CPU: a REAL vLLM server started by the pool on core 1, weights pushed while requests are running.

"wait": the push returns at once (the reload runs in the background); the running request finishes on the weights
it started with and its log-probs are the OLD model's; a request sent during the drain runs on the new weights,
whose log-probs are the NEW model's. "keep" (PipelineRL): the running request is frozen for the reload and goes on
with the new weights, and its sample records both versions.

Also checked on the same servers (issue 19): the push's version is recorded at once (`policy_version`, as on every
other rank) while the servers' version (`serving_version`) follows the reload; weights go to `<run>/.weights` in the
servers' dtype (asked through the worker extension), a killed run's leftovers there are removed at start, an old
version is removed once the servers loaded a newer one, and the bytes are in the push's stats; a failed reload is
raised by `check_alive`, by the next push and by `close`, which stops the servers and removes the weights first."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from qed_lightning.parallel.distributed import iter_full_parameters

from qed_lightning.rollout import LocalVLLMPool, SamplingConfig
from runs import run_process
from sampling import T, chat_prompt, trainer_logprobs
from test_async_layout import assert_no_server_left

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _long_request(pool: LocalVLLMPool, prompt: list[int], seed: int, out: dict) -> None:
    """1,500 tokens whatever the model says (ignore_eos): long enough to be running when the push comes."""
    body = pool.servers.request_body(prompt, SamplingConfig(temperature=T, max_new_tokens=1500), 1, seed)
    body["sampling_params"]["ignore_eos"] = True
    reply = pool.servers.post(f"{pool.urls[0]}{pool.servers.api.path}", body)
    out["sample"] = pool.servers.parse_choice(prompt, reply["choices"][0], -1)


def _train_one_step(model) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    ids = torch.arange(3, 40).unsqueeze(0)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    model.eval()


def _while_running(pool: LocalVLLMPool, prompt: list[int], seed: int, push) -> dict:
    out: dict = {}
    worker = threading.Thread(target=_long_request, args=(pool, prompt, seed, out))
    worker.start()
    time.sleep(2.0)  # the request is decoding
    push(out)
    worker.join(timeout=600)
    return out


def test_weights_pushed_while_generating_and_each_samples_versions(tiny_model_dir, tiny_tokenizer, tmp_path):
    pool = LocalVLLMPool(cpus=["1"], update_mode="wait", max_model_len=2048)
    run = tmp_path / "run"
    (run / ".weights" / "v7").mkdir(parents=True)  # what a killed run left
    (run / ".weights" / "v7" / "model-00001.safetensors").write_bytes(b"x" * 1000)
    pool.use_run_dir(run)
    pool.start(str(tiny_model_dir))
    weights = run / ".weights"
    try:
        assert not (weights / "v7").exists() and pool.sync_dir == weights.resolve()
        assert pool.push_dtype == torch.float32  # the CPU server's dtype, asked through the worker extension
        assert pool.log_paths[pool.urls[0]] == (run / "vllm_logs" / "vllm_server_0.log").resolve()
        prompt = chat_prompt(tiny_tokenizer)
        old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        _train_one_step(new)
        after: dict = {}

        def push_wait(running: dict) -> None:
            after["stats"] = pool.push_weights(iter_full_parameters(new), 1)
            after["returned_while_running"] = "sample" not in running  # the trainer does not wait for the drain
            after["versions"] = (pool.policy_version, pool.serving_version)  # recorded at once; loaded: not yet
            config = SamplingConfig(temperature=T, max_new_tokens=24, seeds=(3,))
            after["sample"] = pool.generate([prompt], config)[0][0]

        running = _while_running(pool, prompt, 11, push_wait)["sample"]
        assert (running.policy_version, running.end_version, len(running.completion_ids)) == (0, None, 1500)
        # finished on the weights it started with
        torch.testing.assert_close(torch.tensor(running.logprobs),
                                   trainer_logprobs(old, prompt, running.completion_ids), atol=1e-4, rtol=0)
        fresh = after["sample"]
        assert fresh.policy_version == 1 and after["returned_while_running"] and after["versions"] == (1, 0)
        assert after["stats"]["push_bytes"] == sum(t.numel() * 4 for _, t in iter_full_parameters(new))  # fp32
        torch.testing.assert_close(torch.tensor(fresh.logprobs), trainer_logprobs(new, prompt, fresh.completion_ids),
                                   atol=1e-4, rtol=0)
        pool.wait_for_push()
        assert (pool.policy_version, pool.serving_version) == (1, 1)

        pool.update_mode = "keep"  # PipelineRL's in-flight update: the running request continues on new weights
        _train_one_step(new)
        mixed = _while_running(pool, prompt, 12,
                               lambda running: pool.push_weights(iter_full_parameters(new), 2))["sample"]
        assert (mixed.policy_version, mixed.end_version) == (1, 2)
        assert pool.policy_version == 2 == pool.serving_version
        assert sorted(p.name for p in weights.glob("v*")) == ["v2"]  # v1 removed once the server loaded v2

        def failing_reload(path, version=None, update_mode=None):  # an injected failure, as reload_all raises one
            raise RuntimeError(f"{pool.describe_server(pool.urls[0])} failed to load weight version v{version}: "
                               "injected")

        pool.update_mode, pool.servers.reload_all = "wait", failing_reload
        pool.push_weights(iter_full_parameters(new), 3)
        pool._pushes[-1].result()  # the background reload failed: recorded, not dropped
        message = rf"vLLM server {pool.urls[0]} \(log .*vllm_server_0.log\) failed to load weight version v3: injected"
        with pytest.raises(RuntimeError, match=message):
            pool.check_alive()  # what the stream's take calls while it waits
        with pytest.raises(RuntimeError, match=message):
            pool.push_weights(iter_full_parameters(new), 4)  # raised before anything is written
        assert not (weights / "v4").exists()
        pool._failure_raised = False  # as if nobody had raised it yet: close raises it, after its cleanup
        with pytest.raises(RuntimeError, match=message):
            pool.close()
        assert not weights.exists() and (run / "vllm_logs" / "vllm_server_0.log").exists()
    finally:
        pool.close()
    assert_no_server_left(tiny_model_dir)


TWO_RANKS = r"""
import json, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from qed_lightning.parallel.distributed import gather_objects, iter_full_parameters, rank
from qed_lightning.rollout import LocalVLLMPool

dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
pool = LocalVLLMPool(cpus=["1"], update_mode="wait", max_model_len=1024)
pool.use_run_dir(Path(sys.argv[2]))
pool.start(sys.argv[1])
out = {"urls": gather_objects(pool.urls), "sync_dir": gather_objects(str(pool.sync_dir))}
try:
    pool.push_weights(iter_full_parameters(model), 1)
    # what WeightSyncCallback.push decides for a second push in this step (the evaluation callback's): the same on
    # every rank, before rank 0's background reload is done
    out["skip_second_push"] = gather_objects(pool.policy_version == 1)
    deadline = time.monotonic() + 300
    while pool.serving_version < 1 and time.monotonic() < deadline:  # rank 1 reads what rank 0's reload wrote
        time.sleep(0.2)
    out["serving"] = gather_objects(pool.serving_version)
    if rank() == 0:  # an injected failure of rank 0's next background reload
        def failing(path, version=None, update_mode=None):
            raise RuntimeError(f"{pool.describe_server(pool.urls[0])} failed to load weight version v{version}: "
                               "injected")
        pool.servers.reload_all = failing
    pool.push_weights(iter_full_parameters(model), 2)
    if rank() == 0:
        pool._pushes[-1].result()
    dist.barrier()
    try:
        pool.check_alive()  # every rank's stream sees it (rank 1 from the state file)
    except RuntimeError as err:
        out["alive"] = str(err)
    out["alive"] = gather_objects(out.get("alive"))
    try:
        pool.push_weights(iter_full_parameters(model), 3)  # rank 0's verdict, on every rank
    except RuntimeError as err:
        out["raised"] = str(err)
    out["raised"] = gather_objects(out.get("raised"))
finally:
    pool.close()
if rank() == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_two_ranks_decide_alike_and_both_raise_rank_0s_failed_reload(tiny_model_dir, tmp_path):
    """Two gloo processes sharing one pool (rank 0 starts the server): after a "wait" push both ranks hold the new
    version at once (before, rank 1 did and rank 0 only after its background reload, so a second push in the same
    step ran on rank 0 alone: a hang under FSDP2/ZeRO-3); both read the servers' loaded version; a failed reload of
    rank 0 is raised on both, by `check_alive` and by the next push, naming the server, its log and the version."""
    script, run = tmp_path / "two_ranks.py", tmp_path / "run"
    script.write_text(TWO_RANKS)
    log = tmp_path / "two_ranks.log"
    code = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tiny_model_dir), str(run)], log, timeout=600)
    output = log.read_text()
    assert code == 0, output[-4000:]
    out = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert out["urls"][0] == out["urls"][1] and len(out["urls"][0]) == 1  # one pool, used by both ranks
    assert out["sync_dir"] == [str((run / ".weights").resolve())] * 2
    assert out["skip_second_push"] == [True, True] and out["serving"] == [1, 1]
    message = (f"vLLM server {out['urls'][0][0]} (log {(run / 'vllm_logs' / 'vllm_server_0.log').resolve()}) "
               "failed to load weight version v2: injected")
    assert out["alive"] == [message, message] and out["raised"] == [message, message]
    assert not (run / ".weights").exists()
    assert_no_server_left(tiny_model_dir)
