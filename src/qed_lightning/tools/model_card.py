"""The model card `qed-export` writes beside the weights (`README.md`, with the Hub's YAML metadata block).

What it says comes from files, never from memory: the checkpoint's saved hyper-parameters (the stage's module
class, the model it started from, the data module's dataset path and step), the run's `config.yaml` when one is found
(the judge's model, client and prompt, the optimizer), and a `qed-eval` `summary.json` when given. Missing facts are
left out rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["STAGES", "card_facts", "find_run_config", "load_card_inputs", "render_model_card"]

#: module class -> the stage it trains (SPEC 1)
STAGES = {"SFTModule": "stage 1: SFT on distilled proofs", "RubricRLModule": "stage 2: rubric-judge RL (GRPO-style)",
          "ReasoningCacheRLModule": "stage 3: reasoning-cache RL"}

TAGS = {"SFTModule": ["sft"], "RubricRLModule": ["grpo", "llm-judge"], "ReasoningCacheRLModule": ["grpo", "reasoning-cache"]}


def find_run_config(checkpoint: Path) -> Path | None:
    """The newest `config.yaml` of the run a checkpoint belongs to (`<run>/checkpoints/X` -> `<run>/csv/version_*`)."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    found = sorted((run / "csv").glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else (run / "config.yaml" if (run / "config.yaml").is_file() else None)


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def card_facts(meta: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """The facts of a card, from a checkpoint's non-tensor entries and the run's parsed config (or None)."""
    hp, data = meta.get("hyper_parameters") or {}, meta.get("datamodule_hyper_parameters") or {}
    module = str(hp.get("_class_path") or _dig(config, "model", "class_path") or "").rsplit(".", 1)[-1]
    judge = _dig(config, "model", "init_args", "judge", "init_args") or {}
    client = judge.get("client") or {}
    optimizer = _dig(config, "model", "init_args", "optimizer") or {}
    facts = {"module": module, "stage": STAGES.get(module, module or "unknown"), "base_model": hp.get("model_name_or_path"),
             "data": data.get("path") or _dig(config, "data", "init_args", "path"), "steps": meta.get("global_step"),
             "judge_model": _dig(client, "init_args", "model"), "judge_client": str(client.get("class_path", "")).rsplit(".", 1)[-1],
             "judge_prompt": judge.get("prompt"), "optimizer": str(optimizer.get("class_path", "")).rsplit(".", 1)[-1],
             "lr": _dig(optimizer, "init_args", "lr"), "precision": _dig(config, "trainer", "precision")}
    for key in ("group_size", "temperature", "max_new_tokens", "cycles"):
        if key in hp:
            facts[key] = hp[key]
    return {k: v for k, v in facts.items() if v not in (None, "")}


def _is_hub_id(value: Any) -> bool:
    text = str(value or "")
    return text.count("/") == 1 and not text.startswith((".", "/")) and not Path(text).exists()


def _front_matter(facts: dict[str, Any]) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["qed-lightning", "theorem-proving", "olympiad-math", *TAGS.get(facts.get("module"), [])]}
    if _is_hub_id(facts.get("base_model")):
        meta["base_model"] = facts["base_model"]
    if _is_hub_id(facts.get("data")):
        meta["datasets"] = [facts["data"]]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _eval_section(summary: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", "", f"`qed-eval` on {summary.get('benchmark', '?')} ({summary.get('path', '')}), "
             f"{summary.get('n', '?')} samples per problem, judge `{_dig(summary, 'judge') or '?'}`:", "",
             "| scaffold | samples | score % of 7 | std % | best-of-n % |", "|---|---|---|---|---|"]
    for name, entry in (summary.get("scaffolds") or {}).items():
        m = entry.get("overall", {})
        lines.append(f"| {name} | {m.get('n', 0):.0f} | {m.get('score_pct', 0):.1f} | {m.get('std_pct', 0):.1f} | "
                     f"{m.get('best_of_n_pct', 0):.1f} |")
    return lines + [""]


def render_model_card(name: str, facts: dict[str, Any], eval_summary: dict[str, Any] | None = None) -> str:
    """The card's markdown (front matter first)."""
    labels = [("stage", "trained"), ("base_model", "started from"), ("data", "data"), ("steps", "optimizer steps"),
              ("judge_model", "judge model"), ("judge_client", "judge client"), ("judge_prompt", "judge prompt"),
              ("optimizer", "optimizer"), ("lr", "learning rate"), ("precision", "precision"),
              ("group_size", "rollouts per prompt (G)"), ("temperature", "sampling temperature"),
              ("max_new_tokens", "max new tokens"), ("cycles", "reasoning-cache cycles")]
    lines = [_front_matter(facts), f"# {name}", "",
             "A causal language model post-trained for olympiad proofs with qed-lightning, a PyTorch Lightning trainer "
             "of the QED-Nano recipe (SFT, rubric-judge RL, reasoning-cache RL).", "",
             "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {label} | `{facts[key]}` |" for key, label in labels if key in facts]
    lines.append("")
    if "Scripted" in str(facts.get("judge_client", "")):
        lines += ["**The judge was a scripted stand-in** (the CPU demo): its scores follow a fixed rule, so this model "
                  "learned that rule, not proof writing.", ""]
    if eval_summary:
        lines += _eval_section(eval_summary)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")', f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              "```", "", "Prompt: `Generate a rigorous proof to the following question:\\n\\n{problem}` as one user turn; "
              "the proof is the text after the last `</think>`.", ""]
    return "\n".join(lines)


def load_card_inputs(config_path: Path | None, eval_summary: Path | None) -> tuple[dict | None, dict | None]:
    """The run's parsed config and the evaluation summary (each None when not given)."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path else None
    summary = json.loads(eval_summary.read_text(encoding="utf-8")) if eval_summary else None
    return config, summary
