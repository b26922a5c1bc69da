"""Sharded weight pushes to a pool: 2 FSDP2 trainer processes (gloo) and 2 REAL `vllm serve` processes (CPU build).

Each push gathers every parameter once over the two trainer ranks (FSDP2 DTensor shards), rank 0 writes one
checkpoint, and both servers reload from it (`sync: checkpoint`; `sync: nccl` shares the gather and the one
broadcast group but needs GPUs, see tests/unit/test_pool_sync.py for its fan-out). Checked through `qed-fit`: the
samples of every step match the trainer's log-probs (both ranks, both servers: on-policy after each push), and
after training each server serves the final weights: its sampler log-probs match a transformers forward of the
exported model to 1e-4; each push's bytes are logged (`rollout/push_bytes`).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from runs import REPO, read_metrics, run_process, series
from sampling import T, chat_prompt, trainer_logprobs
from transformers import AutoModelForCausalLM
from vllm_server import POOL_FLAGS, SHARED_NAME, vllm_serve

from qed_lightning.parallel.distributed import iter_full_parameters
from qed_lightning.rollout import SamplingConfig, VLLMServerEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 2


def test_fsdp2_trainers_push_each_parameter_once_to_every_server(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                 shared_vllm_server):
    # server a: the suite's shared `vllm serve` of the tiny model (serving its weights now, as a fresh one would);
    # server b: a pool member of its own, under the same served name (a pool serves one model)
    a = shared_vllm_server
    with vllm_serve(tiny_model_dir, tmp_path / "b.log", *POOL_FLAGS, "--served-model-name", SHARED_NAME,
                    env={"VLLM_SERVER_DEV_MODE": "1"}) as b:
        engine = {"class_path": "qed_lightning.rollout.VLLMServerEngine",
                  "init_args": {"urls": [a, b], "sync": "checkpoint", "sync_dir": str(tmp_path / "sync")}}
        root = tmp_path / "run"
        cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"),
               "--config", str(REPO / "configs/strategy/fsdp2.yaml"), "--trainer.devices", "2",
               "--trainer.max_steps", str(STEPS), "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
               "--trainer.enable_checkpointing", "false", "--model.init_args.model_name_or_path", str(tiny_model_dir),
               "--model.init_args.export_dir", str(root / "hf"), "--model.init_args.max_new_tokens", "16",
               "--model.init_args.engine", json.dumps(engine), "--data.init_args.prompts_per_step", "4",
               "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
               "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
               "--data.init_args.val_size", "0"]
        assert run_process(cmd, tmp_path / "fit.log", timeout=900) == 0, (tmp_path / "fit.log").read_text()[-4000:]
        rows = read_metrics(root)
        assert series(rows, "rollout/policy_version") == [1.0, 2.0]
        gaps = series(rows, "rollout/logprob_diff_max")  # both ranks' samples, from both servers
        assert len(gaps) == STEPS and max(gaps) < 1e-4, gaps
        assert [p.name for p in (tmp_path / "sync").iterdir()] == ["v2"]  # one checkpoint per push, for all servers

        final = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        # the bytes each push wrote, logged: the servers' dtype (float32 CPU servers, asked at start) once per push
        nbytes = sum(t.numel() * 4 for _, t in iter_full_parameters(final))
        assert series(rows, "rollout/push_bytes") == [float(nbytes)] * STEPS
        prompt = chat_prompt(tiny_tokenizer)
        for url in (a, b):
            probe = VLLMServerEngine([url], sync="none", reset_on_start=False)
            (sample,) = probe.generate([prompt], SamplingConfig(temperature=T, max_new_tokens=24, seed=3))[0]
            probe.close()
            served = torch.tensor(sample.logprobs)
            torch.testing.assert_close(served, trainer_logprobs(final, prompt, sample.completion_ids),
                                       atol=1e-4, rtol=0)
            # and not the starting weights (two steps at lr 1e-3 move the log-probs by much more than the tolerance)
            assert (served - trainer_logprobs(initial, prompt, sample.completion_ids)).abs().max() > 1e-3, url
