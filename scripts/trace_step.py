"""Which files of the package one RL training step runs: the demo RL config (configs/demo/rl.yaml) on the tiny
model, with `RubricRLModule.training_step` of step `--step` traced by `sys.settrace` (and `threading.settrace` for
the threads it starts); prints each file with its number of function calls, then the count of files.

    PYTHONPATH=src python scripts/trace_step.py                          # the demo's in-process vLLM engine
    PYTHONPATH=src python scripts/trace_step.py --engine hf              # transformers engine (no vLLM start-up)

The step traced is a whole `training_step` (sample, grade, advantage, loss, optimizer step); the weight push after it
(`WeightSyncCallback.on_train_batch_end`) and code in threads started before the step (a judge server) are not.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "tiny"),
                        help="policy weights (default: the tiny model)")
    parser.add_argument("--engine", choices=["demo", "hf"], default="demo", help="demo: the config's engine")
    parser.add_argument("--step", type=int, default=1, help="which optimizer step to trace (0 = the first)")
    args, extra = parser.parse_known_args()

    import qed_lightning
    from qed_lightning.cli import make_cli
    from qed_lightning.modules import RubricRLModule

    package = Path(qed_lightning.__file__).parent
    calls: collections.Counter[str] = collections.Counter()

    def tracer(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(str(package)):
            calls[str(Path(path).relative_to(package))] += 1
        return None

    original = RubricRLModule.training_step

    def traced_step(self, batch, batch_idx):
        if self.global_step != args.step:
            return original(self, batch, batch_idx)
        threading.settrace(tracer)
        sys.settrace(tracer)
        try:
            return original(self, batch, batch_idx)
        finally:
            sys.settrace(None)
            threading.settrace(None)

    RubricRLModule.training_step = traced_step
    root = tempfile.mkdtemp(prefix="trace-step-")
    cli_args = ["--config", str(REPO / "configs" / "demo" / "rl.yaml"),
                "--model.init_args.model_name_or_path", args.model,
                "--trainer.max_steps", str(args.step + 1), "--trainer.limit_val_batches", "0",
                "--trainer.default_root_dir", root, "--model.init_args.export_hf", "false",
                "--model.init_args.judge.init_args.cache_path", f"{root}/grades.sqlite",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    if args.engine == "hf":
        cli_args += ["--model.init_args.engine", "qed_lightning.rollout.HFEngine"]
    sys.argv = sys.argv[:1]  # the CLI reads `args=` only
    make_cli(cli_args + extra)
    for name, n in sorted(calls.items()):
        print(f"{n:7d}  {name}")
    print(f"{len(calls)} package files ran in RL step {args.step}")


if __name__ == "__main__":
    main()
