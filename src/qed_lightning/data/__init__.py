"""The data layer: loading and checking rows, rubric and chat formats, and the stage data modules.

It sits at the floor: nothing here imports the reward, rollout or module packages. The data modules (which import
Lightning and torch) load on first use, so the format helpers (`qed_lightning.data.rubric`, `.chat`) stay light
for the judge side that imports them.
"""

from qed_lightning.data.loading import DataError, load_rows


def __getattr__(name: str):
    if name == "ProofProblem":
        from qed_lightning.data.records import ProofProblem

        return ProofProblem
    if name == "ProofRLDataModule":
        from qed_lightning.data.rl import ProofRLDataModule

        return ProofRLDataModule
    if name == "SFTDataModule":
        from qed_lightning.data.sft import SFTDataModule

        return SFTDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "ProofProblem", "ProofRLDataModule", "SFTDataModule", "load_rows"]
