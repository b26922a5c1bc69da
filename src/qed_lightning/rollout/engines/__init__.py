"""Rollout engines behind `rollout.base.RolloutEngine`: vLLM in-process (`vllm_engine`), transformers
(`hf_engine`), a pool of vLLM servers (`server_engine`), a pool started on this node (`local_pool`), the HTTP
client both pools talk to their servers through (`server_pool`), and their process plumbing (`launch`,
`local_servers`, `server_guard`, `vllm_worker`)."""
