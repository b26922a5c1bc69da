"""Bad input is refused before any model loads, with an error naming the file, row, column or flag.

Each case is one row of the README's "Bad input" table. `from_pretrained` of a causal LM is made to fail loudly, so
an error raised by a model load (instead of by validation at the door) would show up as the wrong message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from qed_lightning.cli import make_cli
from runs import subprocess_env

REPO = Path(__file__).resolve().parents[2]
RL_ROWS = [json.loads(line) for line in (REPO / "data/samples/fineproofs_rl.jsonl").read_text().splitlines()
           if line.strip()]


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _write(path: Path, rows: list[dict] | bytes) -> Path:
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _fit(config: str, tiny: Path, tmp: Path, *overrides: str) -> None:
    make_cli(args=["--config", str(REPO / config), "--trainer.default_root_dir", str(tmp / "run"),
                   "--model.init_args.model_name_or_path", str(tiny), *overrides])


def _rl(tiny, tmp, data: Path, *overrides: str) -> None:
    _fit("configs/demo/rl.yaml", tiny, tmp, "--data.init_args.path", str(data),
         "--model.init_args.judge.init_args.cache_path", str(tmp / "g.sqlite"), *overrides)


def _rows(**changes) -> list[dict]:
    rows = [dict(r) for r in RL_ROWS[:6]]
    for index, (column, value) in changes.items():
        rows[int(index[1:])][column] = value
    return rows


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{k: v for k, v in r.items() if k != "rubrics"} for r in RL_ROWS[:6]], r"missing column\(s\) \['rubrics'\]"),
        (_rows(r2=("problem", "   ")), r"line 3, column 'problem': empty string"),
        (_rows(r3=("rubrics", 5)), r"line 4, column 'rubrics': expected a markdown string or a list of "
                                   r"\{title, points, description\} items, got int"),
        (_rows(r1=("rubrics", RL_ROWS[1]["rubrics"].replace("**1 pt**", "**2 pts**", 1))),
         r"line 2, column 'rubrics': rubric checkpoints total \d+ points, expected 7"),
        (b'{"problem": "P", "rubrics": "R"}\n{"problem": "caf\xe9", "rubrics": "R"}\n', r"line 2: not valid UTF-8"),
        (b"", r"the file is empty"),
    ],
    ids=["missing-column", "empty-value", "wrong-type", "rubric-not-7", "non-utf8", "empty-file"],
)
def test_malformed_rl_data_is_named(tiny_model_dir, tmp_path, rows, expected):
    data = _write(tmp_path / "rl.jsonl", rows)
    with pytest.raises(ValueError, match=expected) as info:
        _rl(tiny_model_dir, tmp_path, data)
    assert str(data) in str(info.value)


def test_malformed_sft_messages_are_named(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "q"}]}, {"messages": "text"}])
    with pytest.raises(ValueError, match=r"line 1, column 'messages': no non-empty assistant message[\s\S]*"
                                         r"line 2, column 'messages': expected a non-empty list"):
        _fit("configs/demo/sft.yaml", tiny_model_dir, tmp_path, "--data.init_args.path", str(data))


def test_negative_group_size_names_the_flag(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.group_size must be >= 2, got -2"):
        _rl(tiny_model_dir, tmp_path, REPO / "data/samples/fineproofs_rl.jsonl", "--model.init_args.group_size", "-2")


def test_shared_prefix_layout_with_gradient_checkpointing_names_both_flags(tiny_model_dir, tmp_path):
    # transformers drops the key/value cache in checkpointed layers, which the shared_prefix layout trains through
    with pytest.raises(ValueError, match=r"model.micro_batch_layout=shared_prefix needs the key/value cache"
                                         r".*gradient_checkpointing=false"):
        _rl(tiny_model_dir, tmp_path, REPO / "data/samples/fineproofs_rl.jsonl", "--model.init_args.micro_batch_layout",
            "shared_prefix", "--model.init_args.gradient_checkpointing", "true")


def test_spare_prompts_without_dynamic_sampling_name_both_flags(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data.spare_prompts_per_step=2 .* set model.skip_flat_groups=true"):
        _rl(tiny_model_dir, tmp_path, REPO / "data/samples/fineproofs_rl.jsonl",
            "--data.init_args.spare_prompts_per_step", "2")


def test_engine_context_shorter_than_prompt_names_the_flag(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.engine.init_args.max_model_len=64 is shorter than the longest "
                                         r"prompt .* raise max_model_len to at least \d+"):
        _rl(tiny_model_dir, tmp_path, REPO / "data/samples/fineproofs_rl.jsonl",
            "--model.init_args.engine.init_args.max_model_len", "64")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.gruop_size", "4"], "gruop_size"),
        (["--model.init_args.aggregation", "sum"], "aggregation"),
        (["--model.init_args.micro_batch_layout", "shared"], "micro_batch_layout"),
        (["--data.init_args.prompts_per_step", "0"], "prompts_per_step must be >= 1"),
        (["--data.init_args.reward_mean_range", "[0.9, 0.1]"],
         "data.reward_mean_range must be [lo, hi] with 0 <= lo <= hi <= 1"),
        (["--data.init_args.on_invalid_row", "ignore"], "on_invalid_row"),
        (["--model.init_args.overlong_buffer", "200", "--model.init_args.max_new_tokens", "96"],
         "model.overlong_buffer must be in [0, model.max_new_tokens=96]"),
    ],
    ids=["typo-in-key", "unknown-choice", "unknown-layout", "zero-prompts", "reversed-range", "unknown-policy",
         "overlong-buffer"],
)
def test_bad_config_values_name_the_flag(tiny_model_dir, tmp_path, capsys, override, expected):
    with pytest.raises((SystemExit, ValueError)) as info:
        _rl(tiny_model_dir, tmp_path, REPO / "data/samples/fineproofs_rl.jsonl", *override)
    message = str(info.value) + capsys.readouterr().err
    assert expected in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.group_size", "1"], ["model.group_size must be >= 2, got 1", "every advantage is 0"]),
        (["--model.init_args.group_size", "0", "--model.init_args.temperature", "0"],
         ["model.group_size must be >= 2, got 0", "model.temperature must be > 0 for RL sampling, got 0.0"]),
    ],
    ids=["group-of-one", "zero-group-and-temperature"],
)
def test_qed_fit_refuses_a_config_value_in_one_line(tiny_model_dir, tmp_path, override, expected):
    """Through the console script: exit status 2 and one `qed-fit: error:` line naming the key, no traceback (a
    module's refusal used to arrive wrapped in jsonargparse's many-line union error, inside a traceback)."""
    cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--model.init_args.model_name_or_path",
           str(tiny_model_dir), *override]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qed-fit: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0])  # one line, the last one
    assert all(part in errors[0] for part in expected), errors[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))
