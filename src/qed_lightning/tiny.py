"""Console-script shim: `qed-make-tiny` lives in `qed_lightning.tools.tiny`. Installs made before the move call
`qed_lightning.tiny:main`; delete this file once every environment is reinstalled (`pip install -e .`)."""

from qed_lightning.tools.tiny import main

__all__ = ["main"]
