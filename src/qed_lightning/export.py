"""Console-script shim: `qed-export` lives in `qed_lightning.tools.export`. Installs made before the move call
`qed_lightning.export:main`; delete this file once every environment is reinstalled (`pip install -e .`)."""

from qed_lightning.tools.export import main

__all__ = ["main"]
