import sys

import pytest


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI warns when both `args=` and sys.argv carry arguments; tests pass `args=` only."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def print_config(capsys):
    """`qed-fit fit --config A --config B ... --print_config` parsed: configs are paths, or relative to the repo."""
    import re
    from pathlib import Path

    import yaml

    from qed_lightning.cli import make_cli

    repo = Path(__file__).resolve().parents[2]

    def printed(*configs) -> dict:
        args = ["fit"] + [arg for c in configs for arg in ("--config", str(repo / c))] + ["--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            make_cli(args=args)
        assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
        # DeepSpeed's first import logs its accelerator choice to stdout ("[date time] [WARNING] [real_accelerator...")
        out = [line for line in capsys.readouterr().out.splitlines()
               if not re.match(r"\[\d{4}-\d\d-\d\d [^]]*\] \[", line)]
        return yaml.safe_load("\n".join(out))

    return printed
