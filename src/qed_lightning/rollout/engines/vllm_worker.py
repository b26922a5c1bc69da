"""Methods added to every worker of a vLLM rollout server, callable through `POST /collective_rpc`.

Start the servers with `--worker-extension-cls qed_lightning.rollout.engines.vllm_worker.QEDWorkerExtension` (vLLM's
mechanism for RL frameworks; the package must be importable in the server's environment).
"""

from __future__ import annotations


class QEDWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def refresh_tied_lm_head(self) -> bool:
        """Re-run the tied lm_head's post-load processing after a `reload_weights` (see `_refresh_tied_lm_head`:
        on the CPU backend the head otherwise keeps a pre-packed copy of the old embeddings; a no-op on GPU for
        unquantized models). Returns True so the caller can tell the method exists."""
        from qed_lightning.rollout.engines.vllm_engine import _refresh_tied_lm_head

        _refresh_tied_lm_head(self.model_runner.get_model())
        return True

    def model_dtype(self) -> str:
        """The dtype the server holds its weights in ("bfloat16"): pushes are written or sent in it."""
        return str(self.model_runner.model_config.dtype).removeprefix("torch.")
