"""The two shipped judges on `BaseJudge` (`judge.py`: concurrency, grade cache, circuit breaker, failure policy):
`RubricJudge`, the stage-2 and stage-3 reward (a proof against its problem's marking scheme), and `ProofBenchJudge`,
IMO-ProofBench grading for `qed-eval` (reference solution and guidelines, the 0/1/6/7 scale). Each says which request
fields it needs, fills its prompt from them and parses its verdict."""

from __future__ import annotations

from dataclasses import replace

from qed_lightning.data.rubric import render_rubric
from qed_lightning.rewards.clients import JudgeClient
from qed_lightning.rewards.judge import BaseJudge
from qed_lightning.rewards.parsing import band_score, parse_points, parse_score, strip_self_evaluation
from qed_lightning.rewards.types import GradeRequest

__all__ = ["ProofBenchJudge", "RubricJudge"]


class RubricJudge(BaseJudge):
    """Stage-2 reward: a judge grades the proof against the problem's marking scheme (the reference's "v1" prompt).

    Args:
        client: the judge backend (`OpenAIJudgeClient`, `EngineJudgeClient`, or `ScriptedJudgeClient` in demos).
        prompt: a packaged template name or a template file with `{problem}`, `{rubric}`, `{proof}`.

    `BaseJudge`'s other arguments pass through (`require_think_close`, `on_failure`, `banding`, `cache_path`,
    `max_down_s`, `probe_interval_s`, `placeholders`, `verdict`, `max_failure_fraction`, `max_concurrency`).
    """

    request_fields = ("problem", "rubric")
    prompt_fields = frozenset({"problem", "rubric", "proof"})

    def __init__(self, client: JudgeClient, prompt: str = "rubric_v1", **kwargs):
        # BaseJudge's other arguments (jsonargparse reads them through kwargs)
        super().__init__(client, prompt, **kwargs)

    def prompt_values(self, request: GradeRequest, proof: str) -> dict[str, str]:
        return {"problem": request.problem, "rubric": render_rubric(request.rubric), "proof": proof}

    def parse(self, reply: str) -> int | None:
        return parse_score(reply, self.verdict)


class ProofBenchJudge(BaseJudge):
    """IMO-ProofBench grading: reference solution + guidelines, 0/1/6/7 scale, `<points>N out of 7</points>`.

    The proof's own trailing self-evaluation is cut before grading. Arguments as for `RubricJudge`; the prompt
    needs `{problem}`, `{reference_solution}`, `{guidelines}`, `{proof}`. With `banding=True` the protocol's four
    values hold for the reported score too: a reply outside them (e.g. 3 out of 7) counts as 1, the partial-credit
    band (the reference counts it as given; its prompt, like ours, asks for one of the four values).
    """

    request_fields = ("problem", "reference_solution", "guidelines")
    prompt_fields = frozenset({"problem", "reference_solution", "guidelines", "proof"})

    def __init__(self, client: JudgeClient, prompt: str = "imo_proofbench_v1", **kwargs):
        # BaseJudge's other arguments (jsonargparse reads them through kwargs)
        super().__init__(client, prompt, **kwargs)
        if self.banding:  # banded scores are other grades than the replies' own: never share a cache key with them
            self.prompt = replace(self.prompt, version=f"{self.prompt.version}+banded")

    def proof_of(self, response: str) -> str | None:
        proof = super().proof_of(response)
        return strip_self_evaluation(proof) if proof else proof

    def prompt_values(self, request: GradeRequest, proof: str) -> dict[str, str]:
        return {
            "problem": request.problem,
            "reference_solution": request.reference_solution or "",
            "guidelines": request.guidelines or "",
            "proof": proof,
        }

    def parse(self, reply: str) -> int | None:
        points = parse_points(reply, self.verdict)
        return band_score(points) if points is not None and self.banding else points
