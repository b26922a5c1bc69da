"""A demo RL run seen from outside, through the real entry points: what `qed-fit` prints (quiet, one line per
phase when the output is not a terminal), the rollout records it keeps, and the `qed-report` page of it and of a
`qed-eval` folder, opened in a real headless Chromium (Debian's `chromium`, driven by Playwright): the curves and the
rollouts are drawn, the score filter works, a rollout's proof is shown beside its rubric and judge reply. And a made-up
paper-scale run (30 steps x 128 rollouts of ~30k characters): its page stays under the default 40 MB, says what it
cut, and Chromium draws its curves (hover at any length, smoothing, one chart per loss kind), its sortable rows, its
math (KaTeX, and back to source) and a GRPO group's samples side by side."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qed_lightning.eval.cli import run as qed_eval
from qed_lightning.report.records import read_rollouts
from qed_lightning.rewards.parsing import extract_proof

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIELDS = {"step", "problem_id", "problem", "rubric", "prompt", "completion", "proof", "score", "reward", "advantage",
          "status", "judge_reply", "finish_reason", "prompt_tokens", "completion_tokens", "policy_version"}


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """A demo RL run as a user starts it (a subprocess, output to a file): its root and what it printed."""
    root = tmp_path_factory.mktemp("demo") / "demo-rl"
    cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"),
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
           "--model.init_args.model_name_or_path", str(tiny_model_dir),
           "--model.init_args.export_dir", str(root / "hf"),
           "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
           "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl")]
    env = {k: v for k, v in os.environ.items()
           if k not in ("QED_LOG_LEVEL", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc.stdout + proc.stderr


@pytest.mark.slow
def test_output_is_quiet_and_tells_each_phase(demo_run):
    _, output = demo_run
    # one line per phase and step (the output is a file, not a terminal), with its counts and rate
    assert len(re.findall(r"^\[step \d\] generate: 16/16 rollouts in [0-9.]+ s, [0-9,]+ tok/s$", output, re.M)) == STEPS
    assert len(re.findall(r"^\[step \d\] grade: 16/16 grades in [0-9.]+ s$", output, re.M)) == STEPS
    assert len(re.findall(r"^\[step \d\] train: (\d+)/\1 micro-batches in [0-9.]+ s$", output, re.M)) == STEPS
    assert re.search(r"^\[step 1\] sync: [0-9.]+ s$", output, re.M)  # the weight push after step 0
    # our lines, not the libraries' chatter: no vLLM INFO, no Lightning tips, no known harmless warnings
    assert "SCRIPTED STAND-IN" in output and "vLLM engine ready" in output
    for noise in (" INFO ", "Tip:", "LD_PRELOAD", "set_num_threads", "GPU available", "chunked prefill"):
        assert noise not in output, noise
    assert len(output.splitlines()) < 60, output


@pytest.mark.slow
def test_every_rollout_is_recorded_once_per_step(demo_run):
    root, _ = demo_run
    files = sorted((root / "rollouts").glob("*"))
    assert [f.name for f in files] == [f"step_{s:06d}.jsonl" for s in range(STEPS)]  # no partial file left behind
    records = read_rollouts(root)
    assert len(records) == STEPS * 16 and all(FIELDS <= set(r) for r in records)
    for r in records:
        assert r["policy_version"] == r["step"] and r["prompt"].count("Generate a rigorous proof") == 1
        if r["status"] == "ok":  # after the last </think>, or all of it (the demo's require_think_close: false)
            proof = extract_proof(r["completion"])
            assert r["proof"] == (r["completion"].strip() if proof is None else proof)
            assert "<score>" in r["judge_reply"] and 0 <= r["score"] <= 7
    for step in range(STEPS):  # advantages are reward minus the group mean (G=4)
        rows = [r for r in records if r["step"] == step]
        for g in range(4):
            group = [r for r in rows if r["group"] == g]
            mean = sum(r["reward"] for r in group) / 4
            assert [r["advantage"] for r in group] == pytest.approx([r["reward"] - mean for r in group], abs=1e-6)


@pytest.fixture(scope="module")
def report(demo_run, tiny_model_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """`qed-report` of the demo run and of a small `qed-eval` folder: the page and the evaluation's samples."""
    root, _ = demo_run
    evaluation = tmp_path_factory.mktemp("eval") / "demo-eval"
    qed_eval(["--config", str(REPO / "configs/eval/demo.yaml"), "--model", str(tiny_model_dir),
              "--output_dir", str(evaluation), "--max_new_tokens", "8", "--benchmark.init_args.limit", "2",
              "--engine", "qed_lightning.rollout.HFEngine"])
    out = root.parent / "report.html"
    printed = subprocess.run(
        [sys.executable, "-m", "qed_lightning.report.cli", str(root), str(evaluation), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True).stdout
    assert printed == f"{out}\n"  # the command's one result line: the page to open
    samples = [json.loads(line) for line in (evaluation / "samples.jsonl").read_text().splitlines()]
    return out, samples


def _score(record: dict) -> str:
    return "none" if record["score"] is None else str(record["score"])


@pytest.mark.slow
def test_report_opens_in_a_real_browser_and_its_score_filter_works(report, demo_run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` "
                    "(scripts/test.sh does: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is in the dev extra: pip install -e '.[dev]'")
    page_path, samples = report
    records = read_rollouts(demo_run[0])
    every = records + samples
    wanted = max(sorted({_score(r) for r in records}), key=lambda s: sum(_score(r) == s for r in records))
    record = next(r for r in records if _score(r) == wanted)  # the first rollout with that score
    requests, errors = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(  # a fresh profile folder (--user-data-dir)
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert errors == [] and [u for u in requests if not u.startswith("file:")] == []  # nothing from a network
        assert page.locator("#curves svg.chart path.line").count() >= 6  # reward, loss, lengths, entropy, ...
        assert page.locator("#curves svg.scores rect").count() >= STEPS  # the judge's score distribution per step
        assert page.locator("#evals table.summary").count() == 2  # the evaluation's summary and per-problem tables
        assert page.locator("#evals svg.bars rect.bar").count() >= 1  # its score histogram: bars over scores, not steps
        assert page.locator("#evals svg.bars text.axis").text_content().startswith("score")
        assert page.locator("tr.rollout").count() == len(every)  # every training rollout and evaluation sample
        page.select_option("#filter-score", wanted)
        shown = page.locator("tr.rollout").evaluate_all("rows => rows.map(r => r.dataset.score)")
        assert shown == [wanted] * sum(_score(r) == wanted for r in every)
        page.select_option("#filter-step", str(record["step"]))
        first = page.locator("tr.rollout").first
        assert first.get_attribute("data-id") == f"0-{records.index(record)}"
        page.locator("#math-toggle").uncheck()  # the texts as written (LaTeX as source)
        first.click()
        detail = page.locator("#detail")
        assert detail.locator("pre.proof").text_content() == (record["proof"] or "(empty)")
        assert detail.locator("pre.rubric").text_content() == record["rubric"]
        assert detail.locator("pre.reply").text_content() == (record["judge_reply"] or "(empty)")
        assert f"problem {record['problem_id']}" in detail.locator(".facts").inner_text()
        # the judge audit (the demo config audits each step with a second scripted judge): its chart, and the filter
        # of the disagreements (|train - audit| >= 2 points) shows exactly those records
        assert page.locator('#curves svg.chart[aria-label^="Judge audit"] path.line').count() >= 3
        page.select_option("#filter-score", "")
        page.select_option("#filter-step", "")
        page.select_option("#filter-audit", "disagree")
        apart = [f"0-{i}" for i, r in enumerate(records) if r.get("audit_score") is not None and r["score"] is not None
                 and abs(r["score"] - r["audit_score"]) >= 2]
        assert page.locator("tr.rollout").evaluate_all("rows => rows.map(r => r.dataset.id)") == apart[:500]
        page.select_option("#filter-audit", "audited")
        assert page.locator("tr.rollout").count() == sum(r.get("audit_score") is not None for r in records) > 0
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# ---- a paper-scale run, made up: the page stays bounded and Chromium draws it ---------------------------------------
STEPS_BIG, GROUPS, G, METRIC_STEPS = 30, 16, 8, 500
PROOF = "We show $x^2 + y^2 \\ge 2xy$ for all reals: $$ (x - y)^2 \\ge 0 .$$ Expanding gives the claim. "


def _paper_scale_run(root: Path) -> Path:
    """30 steps x 128 rollouts (16 groups of G=8) of ~30k-character completions (~160 MB of records, the size that
    made a blank page), a 500-step metrics CSV and a DAPO config; beside it an SFT run (its own loss chart)."""
    rl = root / "paper-rl"
    (rl / "rollouts").mkdir(parents=True)
    thinking = "<think>" + "Let me consider the cases one by one. " * 790 + "</think>\n"  # ~30k characters
    for step in range(STEPS_BIG):
        with open(rl / "rollouts" / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(GROUPS * G):
                g, k = divmod(i, G)
                score = (step + g + k) % 8
                proof = f"[s{step} g{g} k{k}] " + PROOF * 120  # ~13k characters: cut
                record = {"step": step, "problem_id": 1000 + g, "group": g, "sample": k, "problem": "Show P." * 60,
                          "rubric": "1. (7 pts) the AM-GM step. " * 80, "prompt": "Generate a rigorous proof. " * 60,
                          "completion": thinking + proof, "proof": proof, "score": score, "reward": score / 7,
                          "advantage": (score - 3.5) / 7, "status": "ok",
                          "judge_reply": "Fine. " * 500 + f"<score>{score}</score>",
                          "finish_reason": "stop", "prompt_tokens": 400, "completion_tokens": 9000 + k,
                          "policy_version": step}
                fh.write(json.dumps(record) + "\n")
    _csv(rl / "csv/version_0", "rollout/reward_mean,rollout/reward_std,train/loss,train/grad_norm,judge/score_7",
         lambda s: f"{s / METRIC_STEPS:.4f},0.1,{0.01 * (-1) ** s:.4f},{1 + s % 7},{s / METRIC_STEPS:.3f}")
    (rl / "csv/version_0/config.yaml").write_text(
        "model:\n  class_path: qed_lightning.modules.RubricRLModule\n  init_args:\n    aggregation: token_mean\n")
    sft = root / "paper-sft"
    _csv(sft / "csv/version_0", "train/loss", lambda s: f"{2.5 - s / 400:.4f}")
    (sft / "csv/version_0/config.yaml").write_text("model:\n  class_path: qed_lightning.modules.SFTModule\n")
    return rl


def _csv(folder: Path, header: str, row) -> None:
    folder.mkdir(parents=True)
    rows = "".join(f"0,{s},{row(s)}\n" for s in range(METRIC_STEPS))
    (folder / "metrics.csv").write_text(f"epoch,step,{header}\n" + rows)


def _browser(pw, profile: Path):
    return pw.chromium.launch_persistent_context(  # a fresh profile folder (--user-data-dir)
        str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"])


def test_a_paper_scale_run_gives_a_bounded_page_that_chromium_draws(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` "
                    "(scripts/test.sh does: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is in the dev extra: pip install -e '.[dev]'")
    rl = _paper_scale_run(tmp_path)
    out = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "qed_lightning.report.cli", str(rl), str(tmp_path / "paper-sft"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    assert proc.stdout == f"{out}\n"
    assert "long texts are cut to 8,000 characters" in proc.stderr
    assert "left out to keep the page under --max_mb 40" in proc.stderr
    assert 30e6 < out.stat().st_size <= 40e6  # the default bound, filled: ~160 MB of records read
    errors = []
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw, tmp_path / "profile")
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert errors == []
        warnings = page.locator("#warnings .warning").all_inner_texts()
        assert len(warnings) == 2 and "3,840 long texts are cut" in warnings[0] and "left out" in warnings[1]
        # the curves: one loss chart per kind, the 500-step reward curve answers a hover at its last steps
        titles = page.locator("#curves .card h3").all_inner_texts()
        assert "Loss: SFT loss (token NLL)" in titles and "Loss: DAPO loss (token_mean)" in titles
        reward = page.locator("#curves .card").filter(has_text="Reward (mean").locator("rect.overlay")
        box = reward.bounding_box()
        label = page.locator("#curves .card").filter(has_text="Reward (mean").locator("text.hover-label")
        for at, near in ((box["width"] - 1, 499), (box["width"] / 2, 250)):
            reward.hover(position={"x": at, "y": box["height"] / 2})
            step = int(re.match(r"step (\d+)", label.text_content()).group(1))
            # reward = step/500
            assert abs(step - near) <= 3 and f"train: {step / METRIC_STEPS:.3g}" in label.text_content()
        page.locator("#smoothing").fill("0.9")  # smoothing: the raw curve stays, faint, under the smoothed one
        assert page.locator("#curves path.line.raw").count() >= 4
        # the rows: every step keeps whole groups of 8
        rows = page.locator("tr.rollout")
        kept = int(page.locator("#row-count").inner_text().split(" of ")[1].split()[0])
        assert kept % G == 0 and kept >= STEPS_BIG * G and rows.count() == 500  # the table lists the first 500
        steps = {int(s) for s in page.locator("#filter-step option").all_inner_texts()[1:]}
        assert steps == set(range(STEPS_BIG))
        page.locator("#rollout-table th[data-key=score]").click()
        page.locator("#rollout-table th[data-key=score]").click()  # descending
        scores = [int(s) for s in rows.evaluate_all("rows => rows.slice(0, 80).map(r => r.dataset.score)")]
        assert scores == sorted(scores, reverse=True) and scores[0] == 7
        rows.first.click()
        detail = page.locator("#detail")
        assert "characters cut: the whole text is in rollouts/step_" in detail.locator("pre.proof").inner_text()
        assert re.search(r"record rollouts/step_\d{6}\.jsonl:\d+", detail.locator(".facts").inner_text())
        assert detail.locator("pre.proof .katex").count() > 10  # math rendered offline ...
        page.locator("#math-toggle").uncheck()  # ... and back to its source
        assert detail.locator("pre.proof .katex").count() == 0
        assert "$x^2 + y^2 \\ge 2xy$" in detail.locator("pre.proof").inner_text()
        # the group: its 8 samples side by side, with their scores
        page.locator("#show-group").click()
        samples = page.locator("#group-view .group-sample")
        assert samples.count() == G
        boxes = [samples.nth(k).bounding_box() for k in range(2)]
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] > boxes[0]["x"]  # side by side
        assert sorted(samples.evaluate_all("s => s.map(x => x.dataset.score)")) == sorted(
            page.locator("#group-view h3").inner_text().split("scores ")[1].split())
        page.screenshot(path=str(tmp_path / "paper.png"))
        browser.close()
