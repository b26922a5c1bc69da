"""The model card `qed-export` writes beside the weights (`README.md`, the Hub's YAML metadata block first), built
with huggingface_hub's `ModelCardData` and `ModelCard`, so the metadata is what the Hub validates and indexes.

What it says comes from files, never from memory: the checkpoint's saved hyper-parameters (the stage's module class,
the model it started from, the data module's dataset path and step), the run's `config.yaml` when one is found (the
judge's model, client and prompt, the optimizer), the installed framework versions, and a `qed-eval` `summary.json`
when given. Missing facts are left out rather than guessed. Three choices:

- **The base model through local stage chains.** A stage that started from a local folder (stage 2 from
  `runs/sft/hf`) names, as `base_model`, the hub model at the start of the chain: read from that folder's own card
  (`README.md`, written by an earlier `qed-export`), else from the run that wrote the folder (`<run>/hf` ->
  `<run>/csv/version_*/config.yaml`'s `model_name_or_path`), else from its `config.json`'s `_name_or_path`,
  following each local folder the same way (`base_model_chain`). The folder itself stays in the table.
- **Evaluation only of this model.** A `summary.json` goes in the card (table and `model-index` eval results) only
  when its `model` is this export (its folder, or the Hub repo it is pushed to); any other is left out with a
  warning that names `--eval_summary`, since a card must not claim another model's scores.
- **Framework versions** from the installed packages' metadata (nothing imported), as TRL's cards list them.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

__all__ = ["STAGES", "base_model_chain", "build_model_card", "card_facts", "eval_matches", "find_run_config",
           "framework_versions", "load_card_inputs", "render_model_card"]

#: module class -> the stage it trains (SPEC 1)
STAGES = {"SFTModule": "stage 1: SFT on distilled proofs", "RubricRLModule": "stage 2: rubric-judge RL (GRPO-style)",
          "ReasoningCacheRLModule": "stage 3: reasoning-cache RL"}

TAGS = {"SFTModule": ["sft"], "RubricRLModule": ["grpo", "llm-judge"],
        "ReasoningCacheRLModule": ["grpo", "reasoning-cache"]}
FRAMEWORKS = ("qed-lightning", "torch", "lightning", "transformers", "vllm", "huggingface_hub")


def find_run_config(checkpoint: Path) -> Path | None:
    """The newest `config.yaml` of the run a checkpoint belongs to (`<run>/checkpoints/X` -> `<run>/csv/version_*`)."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return _run_config(run)


def _run_config(run: Path) -> Path | None:
    found = sorted((run / "csv").glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else (run / "config.yaml" if (run / "config.yaml").is_file() else None)


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _is_hub_id(value: Any) -> bool:
    text = str(value or "")
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def _parent_of_folder(folder: Path) -> str | None:
    """What a local model folder was made from (module docstring, first choice), or None."""
    card = folder / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        base = ModelCard.load(card, ignore_metadata_errors=True).data.base_model
        base = base[0] if isinstance(base, list) and base else base
        if base:
            return str(base)
    for run in (folder.parent, folder):  # `<run>/hf` (export_hf's default) or a run folder given itself
        config = _run_config(run)
        if config is not None:
            config_data = yaml.safe_load(config.read_text(encoding="utf-8"))
            parent = _dig(config_data, "model", "init_args", "model_name_or_path")
            if parent and Path(str(parent)).resolve() != folder.resolve():
                return str(parent)
    if (folder / "config.json").is_file():
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
        if name and Path(str(name)).resolve() != folder.resolve():
            return str(name)
    return None


def base_model_chain(start: str | None, limit: int = 10) -> list[str]:
    """`start`, then what each local folder was made from, until a hub id or an unknown origin (at most `limit`).

    >>> base_model_chain("Qwen/Qwen3-4B")
    ['Qwen/Qwen3-4B']
    """
    chain: list[str] = []
    current = start
    while current and current not in chain and len(chain) < limit:
        chain.append(current)
        if _is_hub_id(current) or not Path(current).is_dir():
            break
        current = _parent_of_folder(Path(current))
    return chain


def card_facts(meta: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """The facts of a card, from a checkpoint's non-tensor entries and the run's parsed config (or None)."""
    hp, data = meta.get("hyper_parameters") or {}, meta.get("datamodule_hyper_parameters") or {}
    module = str(hp.get("_class_path") or _dig(config, "model", "class_path") or "").rsplit(".", 1)[-1]
    judge = _dig(config, "model", "init_args", "judge", "init_args") or {}
    client = judge.get("client") or {}
    optimizer = _dig(config, "model", "init_args", "optimizer") or {}
    started = hp.get("model_name_or_path") or _dig(config, "model", "init_args", "model_name_or_path")
    chain = base_model_chain(str(started)) if started else []
    facts = {"module": module, "stage": STAGES.get(module, module or "unknown"), "base_model": started,
             "origin_model": chain[-1] if len(chain) > 1 and _is_hub_id(chain[-1]) else None,
             "data": data.get("path") or _dig(config, "data", "init_args", "path"), "steps": meta.get("global_step"),
             "judge_model": _dig(client, "init_args", "model"),
             "judge_client": str(client.get("class_path", "")).rsplit(".", 1)[-1],
             "judge_prompt": judge.get("prompt"), "optimizer": str(optimizer.get("class_path", "")).rsplit(".", 1)[-1],
             "lr": _dig(optimizer, "init_args", "lr"), "precision": _dig(config, "trainer", "precision")}
    for key in ("group_size", "temperature", "max_new_tokens", "cycles"):
        if key in hp:
            facts[key] = hp[key]
    return {k: v for k, v in facts.items() if v not in (None, "")}


def framework_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (those installed)."""
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def eval_matches(summary: dict[str, Any], out: Path, repo_id: str | None = None) -> bool:
    """Whether a `qed-eval` summary scored this export: its `model` is the folder `out` or the Hub repo `repo_id`."""
    model = str(summary.get("model") or "")
    if not model:
        return False
    if repo_id and model == repo_id:
        return True
    return Path(model).expanduser().resolve() == out.resolve()


def _eval_results(name: str, summary: dict[str, Any]):
    from huggingface_hub import EvalResult

    benchmark = str(summary.get("benchmark") or "qed-eval")
    return [EvalResult(task_type="text-generation", task_name="proof writing", dataset_type=benchmark,
                       dataset_name=benchmark, metric_type="score_pct", metric_name=f"{scaffold}: score % of 7",
                       metric_value=round(float(entry["overall"]["score_pct"]), 2))
            for scaffold, entry in (summary.get("scaffolds") or {}).items()
            if "score_pct" in (entry.get("overall") or {})]


def _card_data(name: str, facts: dict[str, Any], summary: dict[str, Any] | None):
    from huggingface_hub import ModelCardData

    hub_base = facts.get("origin_model") or (facts.get("base_model") if _is_hub_id(facts.get("base_model")) else None)
    results = _eval_results(name, summary) if summary else []
    return ModelCardData(
        model_name=name, base_model=hub_base, datasets=[facts["data"]] if _is_hub_id(facts.get("data")) else None,
        library_name="transformers", pipeline_tag="text-generation", eval_results=results or None,
        tags=["qed-lightning", "theorem-proving", "olympiad-math", *TAGS.get(facts.get("module"), [])])


def _eval_section(summary: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", "", f"`qed-eval` on {summary.get('benchmark', '?')} ({summary.get('path', '')}), "
             f"{summary.get('n', '?')} samples per problem, judge `{_dig(summary, 'judge') or '?'}`:", "",
             "| scaffold | samples | score % of 7 | std % | best-of-n % |", "|---|---|---|---|---|"]
    for name, entry in (summary.get("scaffolds") or {}).items():
        m = entry.get("overall", {})
        lines.append(f"| {name} | {m.get('n', 0):.0f} | {m.get('score_pct', 0):.1f} | {m.get('std_pct', 0):.1f} | "
                     f"{m.get('best_of_n_pct', 0):.1f} |")
    return lines + [""]


def _body(name: str, facts: dict[str, Any], summary: dict[str, Any] | None, versions: dict[str, str]) -> list[str]:
    labels = [("stage", "trained"), ("base_model", "started from"), ("origin_model", "base model (start of the chain)"),
              ("data", "data"), ("steps", "optimizer steps"), ("judge_model", "judge model"),
              ("judge_client", "judge client"), ("judge_prompt", "judge prompt"), ("optimizer", "optimizer"),
              ("lr", "learning rate"), ("precision", "precision"),
              ("group_size", "rollouts per prompt (G)"), ("temperature", "sampling temperature"),
              ("max_new_tokens", "max new tokens"), ("cycles", "reasoning-cache cycles")]
    lines = [f"# {name}", "",
             "A causal language model post-trained for olympiad proofs with qed-lightning, a PyTorch Lightning trainer "
             "of the QED-Nano recipe (SFT, rubric-judge RL, reasoning-cache RL).", "",
             "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {label} | `{facts[key]}` |" for key, label in labels if key in facts]
    lines.append("")
    if "Scripted" in str(facts.get("judge_client", "")):
        lines += ["**The judge was a scripted stand-in** (the CPU demo): its scores follow a fixed rule, so this model "
                  "learned that rule, not proof writing.", ""]
    if summary:
        lines += _eval_section(summary)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              "```", "", "Prompt: `Generate a rigorous proof to the following question:\\n\\n{problem}` as one user "
              "turn; the proof is the text after the last `</think>`.", ""]
    if versions:
        lines += ["## Framework versions", "", *[f"- {k}: {v}" for k, v in versions.items()], ""]
    return lines


def build_model_card(name: str, facts: dict[str, Any], eval_summary: dict[str, Any] | None = None,
                     versions: dict[str, str] | None = None):
    """The card as a `huggingface_hub.ModelCard` (metadata validated by huggingface_hub); `eval_summary` must
    already be checked to be this model's (`eval_matches`)."""
    from huggingface_hub import ModelCard

    data = _card_data(name, facts, eval_summary)
    body = _body(name, facts, eval_summary, framework_versions() if versions is None else versions)
    return ModelCard("---\n" + data.to_yaml() + "\n---\n" + "\n".join(body))


def render_model_card(name: str, facts: dict[str, Any], eval_summary: dict[str, Any] | None = None,
                      versions: dict[str, str] | None = None) -> str:
    """The card's markdown (front matter first)."""
    return str(build_model_card(name, facts, eval_summary, versions))


def load_card_inputs(config_path: Path | None, eval_summary: Path | None) -> tuple[dict | None, dict | None]:
    """The run's parsed config and the evaluation summary (each None when not given)."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path else None
    summary = json.loads(eval_summary.read_text(encoding="utf-8")) if eval_summary else None
    return config, summary
