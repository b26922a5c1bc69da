"""`Evaluator`: generate n samples per benchmark problem with a scaffold, grade them, report (SPEC 6).

The run, as a short list of named steps:
1. load: the benchmark is read and validated, the judge is checked against what the benchmark provides, and the
   folder's manifest against this run's settings, all before a model loads;
2. plan: keys (problem id, sample index, scaffold) already graded are skipped; generated but ungraded ones are
   graded without regenerating (`store`);
3. generate + grade, chunk by chunk (`batch_size` samples per scaffold call): generations are appended to
   `generations.jsonl` as soon as they exist, grades to `samples.jsonl` as soon as they exist;
4. report: `summary.json`, a rich table and `scores.png`, from every graded sample in the folder.

Grading: a trailing "Self Evaluation"-style section is cut from the proof before any judge sees it
(`EvalProblem.grade_request`, for the rubric judge too), and grades go through the judge's grade cache, which the
evaluator puts at `<output_dir>/grades.sqlite` when the judge has none. A judge failure is reported as such
(`failure_rate`), scored as the judge's `on_failure` says, and regraded on the next run (`regrade_failures`).
Samples record the judge they were graded by; switching the judge regrades stored generations without regenerating.

A second judge (`audit_judge`, any judge config, e.g. a stronger model or another prompt) grades the same samples the
judge scored after the report; their agreement (`rewards.audit.agreement`: both judges' mean score / 7, the gap,
the share within one point, the mean absolute difference in points, Spearman's rank correlation, null when
undefined) goes to `summary.json` under `audit`, a table, and `audit.jsonl` (both grades and the audit's reply per
sample). Its grades go through its own grade cache (`<output_dir>/audit_grades.sqlite` unless it has one).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from qed_lightning.data.loading import ConfigError
from qed_lightning.eval import report
from qed_lightning.eval.agreement import judge_agreement, load_human_grades
from qed_lightning.eval.benchmarks import Benchmark, EvalProblem
from qed_lightning.eval.scaffolds import DirectScaffold, Scaffold, sampling_settings
from qed_lightning.eval.store import JsonlLog, SampleKey, SampleStore, check_manifest
from qed_lightning.rewards.audit import agreement
from qed_lightning.rewards.cache import GradeCache
from qed_lightning.rewards.judge import BaseJudge
from qed_lightning.rollout.base import RolloutEngine, SamplingConfig
from qed_lightning.seeds import derive_seed

__all__ = ["Evaluator", "judge_id"]

log = logging.getLogger(__name__)


def judge_id(judge: BaseJudge) -> str:
    """What identifies a judge's grades: class, judge model, prompt version and what it grades."""
    return f"{type(judge).__name__}|{judge.client.model_name}|{judge.prompt.version}|think={judge.require_think_close}"


def model_sampling(model: str, temperature: float | None, top_p: float | None, top_k: int | None
                   ) -> tuple[float, float, int]:
    """(temperature, top_p, top_k): each value given, else the model's `generation_config.json`, else vLLM's
    defaults (1.0, 1.0, off); logged."""
    defaults: dict[str, Any] = {}
    if None in (temperature, top_p, top_k):
        from transformers import GenerationConfig

        try:
            # the values the file sets (its diff against transformers' defaults), as vLLM's generation_config="auto"
            defaults = GenerationConfig.from_pretrained(model).to_diff_dict()
        except (OSError, ValueError):
            log.warning("qed-eval: %s has no generation_config.json; unset sampling values take vLLM's defaults "
                        "(temperature 1.0, top_p 1.0, no top_k)", model)
    temperature = temperature if temperature is not None else float(defaults.get("temperature") or 1.0)
    top_p = top_p if top_p is not None else float(defaults.get("top_p") or 1.0)
    top_k = top_k if top_k is not None else int(defaults.get("top_k") or -1)
    log.info("qed-eval sampling: temperature %s, top_p %s, top_k %s", temperature, top_p, top_k)
    return temperature, top_p, top_k


class Evaluator:
    """Generate, grade and report on one benchmark; see the module docstring.

    Args:
        model: the policy checkpoint (local folder or hub id); its tokenizer renders the prompts.
        benchmark: `IMOProofBench`, `ProofBench` or `RubricBenchmark` (FineProofs-RL-test).
        judge: `ProofBenchJudge` (IMO-ProofBench) or `RubricJudge` (rubric benchmarks), with any judge client.
        engine: rollout engine; None = `VLLMEngine()` on `model`.
        scaffold: `DirectScaffold` (None), `ReasoningCacheScaffold` or `GenerateVerifyRefine`.
        n: samples per problem; sample k of every problem forms run k (the std is over runs).
        temperature, top_p, top_k: sampling; None (the default) = the model's own `generation_config.json`, as
            the reference's released evaluation config leaves it (Qwen3-4B-Thinking-2507's: T 0.6, top_p 0.95,
            top_k 20; vLLM's defaults 1.0 / 1.0 / off for a value the file does not set). Set to override (the paper
            also reports T 0.8). The values used are logged and kept in the output folder's manifest.
        max_new_tokens: the generation budget.
        output_dir: where samples, grades, the summary and the plot go; rerunning resumes there.
        seed: sampling seed; each sample's seed is `derive_seed(seed, problem id, sample index, scaffold)`, so a
            sample is the same whichever chunk or resumed run generates it.
        batch_size: samples per scaffold call; each finished chunk is written before the next starts.
        regrade_failures: on a rerun, ask the judge again about samples whose grading failed.
        plot: write `scores.png`.
        audit_judge: a second judge that grades the same samples; its agreement with `judge` is reported (module
            docstring). None (the default): no audit.
    """

    def __init__(self, model: str, benchmark: Benchmark, judge: BaseJudge, engine: RolloutEngine | None = None,
                 scaffold: Scaffold | None = None, n: int = 4, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, max_new_tokens: int = 49152,
                 output_dir: str = "runs/eval", seed: int = 0,
                 batch_size: int = 256, regrade_failures: bool = True, plot: bool = True,
                 audit_judge: BaseJudge | None = None) -> None:
        problems = [f"{name} must be >= 1, got {value}" for name, value in
                    (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)) if value < 1]
        if temperature is not None and temperature < 0:
            problems.append(f"temperature must be >= 0, got {temperature}")
        for key, one in (("judge", judge), ("audit_judge", audit_judge)):
            missing = sorted(set(one.request_fields) - benchmark.provides) if one is not None else []
            if missing:
                problems.append(f"the {key} {type(one).__name__} needs {missing}, which {benchmark.name} does not "
                                "provide; grade IMO-ProofBench with qed_lightning.rewards.ProofBenchJudge and rubric "
                                "benchmarks (ProofBench, FineProofs-RL-test) with qed_lightning.rewards.RubricJudge")
        engine_model = getattr(engine, "model", None)
        if isinstance(engine_model, str) and engine_model != model:
            problems.append(f"engine.init_args.model={engine_model!r} differs from model={model!r}; leave the engine's "
                            "model unset (the evaluator passes `model` to it)")
        if problems:
            raise ConfigError("; ".join(problems) + ".")  # qed-eval prints it on one line (exit status 2)
        from qed_lightning.rollout.engines.vllm_engine import VLLMEngine

        self.model, self.benchmark, self.judge = model, benchmark, judge
        self.engine = engine if engine is not None else VLLMEngine()
        self.scaffold = scaffold if scaffold is not None else DirectScaffold()
        self.n, self.seed, self.batch_size = n, seed, batch_size
        temperature, top_p, top_k = model_sampling(model, temperature, top_p, top_k)
        self.sampling = SamplingConfig(temperature, top_p, top_k, max_new_tokens, seed)
        self.output_dir = Path(output_dir)
        self.regrade_failures, self.plot = regrade_failures, plot
        if judge.cache is None:
            judge.cache = GradeCache(self.output_dir / "grades.sqlite")
        self.audit_judge = audit_judge
        if audit_judge is not None and audit_judge.cache is None:
            audit_judge.cache = GradeCache(self.output_dir / "audit_grades.sqlite")
        self.tokenizer = None
        self.stats: Counter[str] = Counter()

    # -- settings ----------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What determines this scaffold's samples (the manifest refuses to resume a folder made otherwise)."""
        b = self.benchmark
        return {"model": self.model, "engine": type(self.engine).__name__, "scaffold": self.scaffold.settings(),
                "benchmark": {"class": b.name, "path": b.path, "subset": b.subset, "split": b.split,
                              "columns": b.columns},
                "sampling": sampling_settings(self.sampling)}

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Generate, grade and report; returns the summary (also written to `summary.json`)."""
        problems = self.benchmark.load()
        check_manifest(self.output_dir, self.scaffold.name, self.settings())
        store = SampleStore(self.output_dir)
        by_id = {p.problem_id: p for p in problems}
        wanted = [(p.problem_id, k, self.scaffold.name) for p in problems for k in range(self.n)]
        to_generate, to_grade = store.plan(wanted, judge_id(self.judge), self.regrade_failures)
        log.info("qed-eval %s/%s: %d samples wanted, %d already graded, %d to grade, %d to generate",
                 self.benchmark.name, self.scaffold.name, len(wanted),
                 len(wanted) - len(to_generate) - len(to_grade), len(to_grade), len(to_generate))
        if to_grade:
            self._grade(store, by_id, to_grade)
        for start in range(0, len(to_generate), self.batch_size):
            chunk = to_generate[start:start + self.batch_size]
            generations = self._generate(by_id, chunk)
            store.generations.append(generations)
            self._grade(store, by_id, generations)
            log.info("qed-eval: %d of %d samples generated and graded", start + len(chunk), len(to_generate))
        summary = self.report(store, wanted)
        if self.audit_judge is not None:
            summary["audit"] = self.audit(by_id, self._rows(store, wanted))
            report.write_json(self.output_dir / "summary.json", summary)
        return summary

    def _start_engine(self) -> None:
        if self.tokenizer is not None:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.engine.start(self.model)  # the engine lifecycle (RolloutEngine); no policy to share here
        self.engine.attach(None, self.tokenizer)

    def _generate(self, by_id: dict[str, EvalProblem], keys: list[SampleKey]) -> list[dict[str, Any]]:
        self._start_engine()
        sampling = replace(self.sampling, seed=None, seeds=tuple(derive_seed(self.seed, *key) for key in keys))
        outputs = self.scaffold.run([by_id[pid].problem for pid, _, _ in keys], self.engine, self.tokenizer, sampling)
        self.stats["generated"] += len(keys)
        return [{"problem_id": pid, "sample": k, "scaffold": name, "prompt": out.prompt, "output": out.response,
                 "tokens": out.tokens, "truncated": out.truncated, "calls": out.calls, "trace": out.trace}
                for (pid, k, name), out in zip(keys, outputs, strict=True)]

    def _grade(self, store: SampleStore, by_id: dict[str, EvalProblem], generations: list[dict[str, Any]]) -> None:
        requests = [by_id[g["problem_id"]].grade_request(g["output"]) for g in generations]
        grades = self.judge.grade(requests)
        self.stats["graded"] += len(grades)
        graded_by = judge_id(self.judge)
        records = []
        for generation, grade in zip(generations, grades, strict=True):
            meta = by_id[generation["problem_id"]].meta
            records.append({**{k: generation[k] for k in ("problem_id", "sample", "scaffold")}, **meta,
                            "score": grade.score, "status": grade.status, "reward": grade.reward,
                            "judge_reply": grade.reply, "judge_cached": grade.cached, "judge": graded_by,
                            **{k: generation[k]
                               for k in ("tokens", "truncated", "calls", "prompt", "output", "trace")}})
        store.samples.append(records)

    # -- reports -----------------------------------------------------------------------------------------------

    def report(self, store: SampleStore, wanted: list[SampleKey]) -> dict[str, Any]:
        """Summary of every scaffold's graded samples of this benchmark's problems (sample index < n)."""
        current = judge_id(self.judge)
        rows = self._rows(store, wanted)
        scaffolds = report.summarize(rows, self.judge.on_failure)
        title = f"{self.benchmark.name} ({self.benchmark.path}), model {self.model}"
        summary = {"benchmark": self.benchmark.name, "path": self.benchmark.path, "model": self.model,
                   "judge": current, "n": self.n, "scaffolds": scaffolds,
                   "this_run": {**{k: self.stats[k] for k in ("generated", "graded")}, **self.judge.pop_metrics()}}
        report.write_json(self.output_dir / "summary.json", summary)
        report.print_table(scaffolds, title, _console())
        if self.plot and scaffolds:
            report.plot_scores(scaffolds, self.output_dir / "scores.png", title)
        return summary

    def _rows(self, store: SampleStore, wanted: list[SampleKey]) -> list[dict[str, Any]]:
        """The samples of this run's problems (sample index < n) graded by the current judge."""
        problems, current = {pid for pid, _, _ in wanted}, judge_id(self.judge)
        return [r for key, r in store.graded().items()
                if key[0] in problems and key[1] < self.n and r.get("judge") == current]

    def audit(self, by_id: dict[str, EvalProblem], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Grade the samples `judge` scored with `audit_judge` too; writes `audit.jsonl`, returns the agreement."""
        scored = [r for r in rows if r.get("score") is not None]
        requests = [by_id[r["problem_id"]].grade_request(r["output"]) for r in scored]
        grades = self.audit_judge.grade(requests) if requests else []
        path = self.output_dir / "audit.jsonl"
        path.unlink(missing_ok=True)
        JsonlLog(path).append([{**{k: r[k] for k in ("problem_id", "sample", "scaffold", "score")},
                                "audit_score": g.score, "audit_status": g.status, "audit_reply": g.reply}
                               for r, g in zip(scored, grades, strict=True)])
        pairs = [(r["score"], g.score) for r, g in zip(scored, grades, strict=True) if g.score is not None]
        out: dict[str, Any] = {"judge": judge_id(self.judge), "audit_judge": judge_id(self.audit_judge),
                               "samples": len(scored), "failed": len(scored) - len(pairs)}
        if pairs:
            numbers = agreement([p[0] for p in pairs], [p[1] for p in pairs])
            out.update({"judge_score_mean": numbers["audit/train_score_mean"],
                        "audit_score_mean": numbers["audit/score_mean"],
                        **{k: numbers[f"audit/{k}"] for k in ("gap", "agree_within_1", "mae", "spearman")}})
            out["spearman"] = None if math.isnan(out["spearman"]) else out["spearman"]
        out["this_run"] = self.audit_judge.pop_metrics()
        report.print_audit(out, f"judge audit: {out['judge']} vs {out['audit_judge']}", _console())
        return out

    def agreement(self, human_grades: str, columns: dict[str, str] | None = None) -> dict[str, Any]:
        """Grade human-graded samples with the judge; writes `agreement.jsonl` and `agreement.json`."""
        problems = {p.problem_id: p for p in self.benchmark.load(select=False)}
        grades = load_human_grades(human_grades, problems, columns)
        numbers, records = judge_agreement(self.judge, problems, grades)
        path = self.output_dir / "agreement.jsonl"
        path.unlink(missing_ok=True)
        JsonlLog(path).append(records)
        summary = {"human_grades": human_grades, "judge": judge_id(self.judge), "agreement": numbers,
                   "this_run": self.judge.pop_metrics()}
        report.write_json(self.output_dir / "agreement.json", summary)
        report.print_agreement(numbers, f"judge agreement: {judge_id(self.judge)} vs {human_grades}", _console())
        return summary

    def close(self) -> None:
        """Free the engine and close the judge (connections, a scripted server, the grade cache)."""
        self.engine.close()
        self.judge.close()
        if self.audit_judge is not None:
            self.audit_judge.close()


def _console() -> Console:
    width = None if os.isatty(1) else 160  # a wide table in captured or redirected output
    return Console(width=width)
