"""Rollout layouts: wrappers that decide *when* an engine generates relative to training.

- `AsyncRollouts` (`async_rollouts`): generates step k+1's batch in the background while step k trains (PipelineRL-
  style, at most `max_lag` steps off-policy), for any engine separate from the trainer's policy;
- `StreamingRollouts` (`streaming_engine`, over the `GroupStream` of `streaming`): a generator that never stops;
  each step takes the first complete, graded groups (the one-node asynchronous layout).
"""
