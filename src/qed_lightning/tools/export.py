"""`qed-export`: a Lightning checkpoint (one file, or the directory a sharded strategy writes) to one HF model folder.

    qed-export runs/rl/csv/version_0/checkpoints/last.ckpt runs/rl/hf-step200
    qed-export CKPT OUT --base runs/sft/hf          # config + tokenizer from another folder than the run's model
    qed-export CKPT OUT --eval_summary runs/eval/imo/summary.json --push_to_hub me/qed-nano-rl

Beside the weights goes a `README.md` model card (`qed_lightning.tools.model_card`, built with huggingface_hub's
`ModelCardData`): the stage, the model it started from and the hub model at the start of its chain, data, judge,
steps, framework versions, and the evaluation summary when it scored this export. The folder's files are readable by
the group (some writers leave 0600). `--push_to_hub REPO` uploads the folder with
huggingface_hub's `HfApi.create_repo` + `upload_folder` (needs network and a token, `HF_TOKEN` or `hf auth login`;
untested here, where no hub is reachable).

Reads, without any process group:
- FSDP2 (`FSDP2Strategy`/`ModelParallelStrategy`) directories: torch distributed checkpoints (DCP). Only the model's
  tensors are read, straight into a model skeleton (`torch.distributed.checkpoint.load`): the optimizer state in the
  same directory is never loaded, so memory stays at one model.
- DeepSpeed directories: consolidated first with Lightning's `convert_zero_checkpoint_to_fp32_state_dict`.
- single files (DDP, one device, `save_distributed_checkpoint: false`): `torch.load` with mmap.
Lightning stores the module's parameters under "model." (the `QEDModule.model` attribute), which is stripped to give
the HF names; a frozen reference model ("ref_model.") is left out. The config and tokenizer come from the run's
`model_name_or_path` (saved in the checkpoint's hyper-parameters) unless `--base` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from qed_lightning.data.loading import ConfigError, debug_requested, exit_on_data_error
from qed_lightning.logs import setup_logging

log = logging.getLogger(__name__)

PREFIX = "model."


def checkpoint_kind(path: Path) -> str:
    """"dcp", "deepspeed" or "file"."""
    if not path.exists():
        raise ConfigError(f"checkpoint: {path} does not exist (a run's checkpoints are in "
                          "<default_root_dir>/checkpoints, e.g. runs/rl/checkpoints/last.ckpt)")
    if path.is_file():
        return "file"
    if (path / ".metadata").exists():
        return "dcp"
    if (path / "latest").exists() or (path / "checkpoint").is_dir():
        return "deepspeed"
    raise ConfigError(f"checkpoint: {path} is neither a checkpoint file, a distributed checkpoint (no .metadata) "
                      "nor a DeepSpeed checkpoint directory (no `latest`)")


def _meta(path: Path, kind: str) -> dict:
    if kind == "dcp":
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    if kind == "file":
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {}


def _skeleton(base: str, dtype: torch.dtype):
    """The HF model of `base`'s config, in `dtype`, without spending time on a random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied weights as one tensor (as from_pretrained leaves them), saved once
    return model


def _missing_ok(model, missing: list[str]) -> list[str]:
    """Drop tied weights (stored once, under the embedding's name) from a list of missing names."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if getattr(model.config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    return [k for k in missing if k not in tied]


def load_dcp_into(model, path: Path) -> None:
    """Fill `model`'s tensors in place from the "state_dict.model.*" entries of a distributed checkpoint."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {}
    for name, tensor in model.state_dict().items():
        if f"state_dict.{PREFIX}{name}" in stored:
            wanted[PREFIX + name] = tensor
    missing = _missing_ok(model, [n for n in model.state_dict() if PREFIX + n not in wanted])
    if missing:
        raise KeyError(f"{path}: the checkpoint has no tensors for {missing[:5]} ({len(missing)} missing); "
                       "is --base the model this run trained?")
    dcp.load({"state_dict": wanted}, checkpoint_id=str(path))


def load_state_into(model, state: dict[str, torch.Tensor], where: Path) -> None:
    hf = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    result = model.load_state_dict(hf, strict=False)
    missing = _missing_ok(model, list(result.missing_keys))
    if missing or result.unexpected_keys:
        raise KeyError(f"{where}: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")


def _dtype_of(path: Path, kind: str, state: dict | None) -> torch.dtype:
    if kind == "dcp":
        import torch.distributed.checkpoint as dcp

        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        first = next(v for k, v in stored.items() if k.startswith(f"state_dict.{PREFIX}") and hasattr(v, "properties"))
        return first.properties.dtype
    return next(v.dtype for k, v in state.items() if k.startswith(PREFIX) and v.is_floating_point())


def export_checkpoint(ckpt: str | Path, out: str | Path, base: str | None = None, run_config: str | Path | None = None,
                      eval_summary: str | Path | None = None, repo_id: str | None = None) -> Path:
    """Write `ckpt`'s model weights as a HF folder `out` (config and tokenizer from `base`) with its model card
    (`write_card`; `repo_id`: the Hub repo it goes to, which an evaluation summary may name); returns `out`. Its
    files are readable by the group (`share_with_group`)."""
    from transformers import AutoTokenizer

    path, out = Path(ckpt), Path(out)
    kind = checkpoint_kind(path)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "deepspeed":
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(Path(tmp) / "full.ckpt"))
            path = Path(tmp) / "full.ckpt"
            kind = "file"
        meta = _meta(path, kind)
        base = base or meta.get("hyper_parameters", {}).get("model_name_or_path")
        if not base:
            raise ValueError(f"{ckpt}: no model_name_or_path in the checkpoint's hyper-parameters; "
                             "pass --base MODEL_DIR")
        state = meta.get("state_dict") if kind == "file" else None
        model = _skeleton(base, _dtype_of(path, kind, state))
        if kind == "dcp":
            load_dcp_into(model, path)
        else:
            load_state_into(model, state, path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    write_card(out, meta, Path(ckpt), run_config, eval_summary, repo_id)
    share_with_group(out)
    log.info("exported %s (step %s) to %s", ckpt, meta.get("global_step"), out)
    return out


def share_with_group(folder: Path) -> None:
    """Give the folder's files the mode a plain `open` gives under the umask, and group read in any case: some
    writers (safetensors, tempfile-renamed files) leave 0600, which hides a shared model from the team."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask | (0o050 if path.is_dir() else 0o040)
        os.chmod(path, path.stat().st_mode & ~0o777 | wanted)


def write_card(out: Path, meta: dict, ckpt: Path, run_config: str | Path | None = None,
               eval_summary: str | Path | None = None, repo_id: str | None = None) -> Path:
    """`out/README.md`: the model card of the checkpoint `ckpt` (its run's config.yaml found unless given). An
    evaluation summary of another model than this one (`out` or `repo_id`) is left out, with a warning."""
    from qed_lightning.tools.model_card import (build_model_card, card_facts, eval_matches, find_run_config,
                                                load_card_inputs)

    config_path = Path(run_config) if run_config else find_run_config(ckpt)
    config, summary = load_card_inputs(config_path, Path(eval_summary) if eval_summary else None)
    if summary is not None and not eval_matches(summary, out, repo_id):
        log.warning("--eval_summary %s scored model %r, not this export (%s%s): left out of the model card; "
                    "run qed-eval --model %s and pass that summary", eval_summary, summary.get("model"), out,
                    f" or {repo_id}" if repo_id else "", out)
        summary = None
    path = out / "README.md"
    build_model_card(repo_id or out.name, card_facts(meta, config), summary).save(path)
    return path


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); returns the commit URL.
    Untested here: our machines reach no hub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message="Upload model exported by qed-export")
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qed-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt file or a sharded checkpoint directory")
    parser.add_argument("out_dir", help="HF folder to write (config, safetensors, tokenizer)")
    parser.add_argument("--base", default=None,
                        help="model folder for config and tokenizer (default: the run's model_name_or_path)")
    parser.add_argument("--run_config", default=None,
                        help="the run's config.yaml for the model card (default: found beside the checkpoint)")
    parser.add_argument("--eval_summary", default=None,
                        help="a qed-eval summary.json of this export (its `model` is OUT_DIR or the --push_to_hub "
                             "repo) to put in the model card; one of another model is left out with a warning")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO",
                        help="upload the folder to this Hub model repo (needs network)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("-v", "--verbose", action="store_true", help="every library's log lines")
    parser.add_argument("--debug", action="store_true", help="the traceback of an error (or QED_DEBUG=1)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    with exit_on_data_error("qed-export", args.debug or debug_requested([])):
        out = export_checkpoint(args.checkpoint, args.out_dir, args.base, args.run_config, args.eval_summary,
                                args.push_to_hub)
    if args.push_to_hub:
        log.info("uploaded to %s", push_to_hub(out, args.push_to_hub, args.private))
    log.info("exported to %s", Path(out).resolve())


if __name__ == "__main__":
    main()
