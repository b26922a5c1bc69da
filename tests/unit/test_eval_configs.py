"""Every configs/eval/*.yaml parses and validates through the real `qed-eval` parser (`--print_config` exits before
any work), and builds its components without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qed_lightning.eval import DirectScaffold, Evaluator, IMOProofBench, ProofBench, RubricBenchmark
from qed_lightning.eval.cli import main, make_evaluator
from qed_lightning.rewards import ProofBenchJudge, RubricJudge

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))
BENCHMARKS = {"imo_proofbench": IMOProofBench, "proofbench": ProofBench, "fineproofs_rl_test": RubricBenchmark,
              "demo": IMOProofBench}


def test_every_benchmark_has_a_config():
    assert {p.stem for p in CONFIGS} == set(BENCHMARKS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", [[], ["agreement", "--human_grades", "data/samples/judge_agreement.jsonl"]],
                         ids=["evaluate", "agreement"])
def test_config_parses_and_prints(path, subcommand, capsys):
    args = [*subcommand[:1], "--config", str(path), *subcommand[1:], "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "${" not in str(printed)
    assert printed["benchmark"]["class_path"] == f"qed_lightning.eval.{BENCHMARKS[path.stem].__name__}"
    assert printed["judge"]["class_path"].startswith("qed_lightning.rewards.")
    assert printed["n"] >= 1 and printed["output_dir"].startswith("runs/eval/")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_its_components_without_a_model(path, monkeypatch, tmp_path):
    monkeypatch.setenv("QED_JUDGE_URL", "http://judge.invalid:8000/v1")
    monkeypatch.setenv("QED_GRADER_URL", "https://grader.invalid/v1")
    name, evaluator, _ = make_evaluator(["--config", str(path), "--output_dir", str(tmp_path)])
    assert name == "evaluate" and isinstance(evaluator, Evaluator)
    assert isinstance(evaluator.benchmark, BENCHMARKS[path.stem])
    assert isinstance(evaluator.judge, ProofBenchJudge if BENCHMARKS[path.stem] is IMOProofBench else RubricJudge)
    assert isinstance(evaluator.scaffold, DirectScaffold)
    assert evaluator.judge.cache.path == tmp_path / "grades.sqlite"  # grades are cached under the output dir
    assert evaluator.tokenizer is None and getattr(evaluator.engine, "llm", None) is None  # nothing heavy yet


def test_scaffolds_are_chosen_by_class_path(tmp_path):
    _, evaluator, _ = make_evaluator(["--config", str(REPO / "configs/eval/demo.yaml"), "--output_dir", str(tmp_path),
                                      "--scaffold", "qed_lightning.eval.GenerateVerifyRefine",
                                      "--scaffold.rounds", "3"])
    assert (evaluator.scaffold.name, evaluator.scaffold.rounds) == ("gvr", 3)


def test_a_typo_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs/eval/demo.yaml"), "--n_sampels", "2"])
    assert exit_info.value.code != 0
    assert "n_sampels" in capsys.readouterr().err


def test_unset_sampling_comes_from_the_models_generation_config(tiny_model_dir, tmp_path, caplog):
    """As the reference's released evaluation config: the model's generation_config.json decides what the config
    leaves unset (the tiny model's sets temperature 0.8 only); a value given wins; no file: vLLM's defaults."""
    import shutil

    from qed_lightning.eval.runner import model_sampling

    assert model_sampling(str(tiny_model_dir), None, None, None) == (0.8, 1.0, -1)
    assert model_sampling(str(tiny_model_dir), 0.6, 0.95, 20) == (0.6, 0.95, 20)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "generation_config.json").unlink()
    with caplog.at_level("WARNING"):
        assert model_sampling(str(bare), None, 0.9, None) == (1.0, 0.9, -1)
    assert "has no generation_config.json" in caplog.text
