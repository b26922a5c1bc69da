"""Stage 3 in `configs/rc.yaml`'s own layout, shrunk to a demo-sized step on CPU: the policy's vLLM engine in the
training process, the summarizer a REAL `vllm serve` process addressed by URL (`VLLMServerEngine`, `sync: none`,
its URL read from `QED_SUMMARIZER_URLS` as on the cluster). Only sizes, devices and the judge (the scripted
stand-in) are overridden; the engine and summarizer blocks are the config's. And the refusal of the layout that
cannot start on GPU: a second in-process vLLM engine, named at the door with the server option.
"""

from __future__ import annotations

import pytest
import torch
from runs import REPO, read_metrics, series

from qed_lightning.cli import make_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DEMO_SIZE = [  # what a CPU and the tiny model need; everything else is configs/rc.yaml
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.strategy", "auto", "--trainer.callbacks", "[]", "--trainer.max_steps", "1",
    "--trainer.val_check_interval", "1",
    "--model.init_args.dtype", "float32", "--model.init_args.attn_implementation", "sdpa",
    "--model.init_args.group_size", "2", "--model.init_args.max_new_tokens", "16", "--model.init_args.cycles", "2",
    "--model.init_args.summarizer_max_new_tokens", "16", "--model.init_args.micro_batch_tokens", "4096",
    "--model.init_args.engine.init_args.dtype", "float32", "--model.init_args.engine.init_args.max_model_len", "2048",
    "--model.init_args.engine.init_args.enforce_eager", "true",
    "--model.init_args.judge.init_args.client", "qed_lightning.testing.ScriptedJudgeClient",
    "--model.init_args.judge.init_args.require_think_close", "false",  # the tiny model rarely closes its thinking
    "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.prompts_per_step", "2",
    "--data.init_args.val_size", "0", "--data.init_args.max_prompt_tokens", "1024",
]


def _args(tiny, root) -> list[str]:
    return ["--config", str(REPO / "configs/rc.yaml"), *DEMO_SIZE, "--trainer.default_root_dir", str(root),
            "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.export_dir", str(root / "hf"),
            "--model.init_args.summarizer_model", str(tiny), "--model.init_args.judge.init_args.cache_path",
            str(root / "grades.sqlite")]


def test_rc_yaml_layout_runs_a_step_with_a_summarizer_server(tiny_model_dir, tmp_path, monkeypatch,
                                                             shared_vllm_server):
    # the suite's shared `vllm serve` of the tiny model (conftest), started as scripts/slurm/vllm_pool.sbatch starts
    # a server; on CPU, seeded requests are prefilled whole. The summarizer is frozen (`sync: none`): it never
    # reloads, and what an earlier test loaded into the server does not matter to the checks below
    url = shared_vllm_server
    monkeypatch.setenv("QED_SUMMARIZER_URLS", url)
    cli = make_cli(args=_args(tiny_model_dir, tmp_path))
    rows = read_metrics(tmp_path)
    summarizer = cli.model.summarizer
    assert type(summarizer).__name__ == "VLLMServerEngine" and summarizer.sync == "none"
    assert summarizer.urls == [url] and summarizer.policy_version == 0  # frozen: never given policy weights
    assert type(cli.model.engine).__name__ == "VLLMEngine" and cli.model.engine.policy_version == 1
    # 2 problems x 2 of the K+1 = 3 states x G=2 rollouts, graded (by the judge, or 0 without a proof)
    assert [a + b for a, b in zip(series(rows, "judge/ok"), series(rows, "judge/truncated"))] == [8.0]
    assert series(rows, "rc/states") == [4.0] and series(rows, "rc/summarizer_s")[0] > 0
    assert 0 < series(rows, "rc/summary_len_mean")[0] <= 16  # the server wrote the summaries, within budget
    assert series(rows, "memory/handoff") == [1.0]  # the config's enable_sleep_mode: the hand-off ran
    assert max(series(rows, "rollout/logprob_diff_max")) < 1e-3


def test_a_second_in_process_engine_is_refused_on_gpu_naming_the_server_option(tiny_model_dir, tmp_path, monkeypatch):
    """On a GPU node the CLI refuses an in-process VLLMEngine summarizer next to the policy's before anything
    loads (checked here with CUDA reported available: the refusal happens before any device is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = [*_args(tiny_model_dir, tmp_path), "--model.init_args.summarizer", "qed_lightning.rollout.VLLMEngine"]
    with pytest.raises(ValueError, match=r"second in-process vLLM engine.*VLLMServerEngine.*sync: none"):
        make_cli(args=args, run=False)
