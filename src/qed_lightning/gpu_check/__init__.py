"""The offline GPU check (`scripts/gpu_check.sh`): seven measurements of the training code on one GPU, as one JSON.

1. `gemm`: bf16 GEMM TFLOP/s at 8192^3, the MFU denominator.
2. `sft`: SFT tokens/s, MFU and peak memory of a random Qwen3-0.6B shape with the full 151,936-token vocabulary, bf16
   compute on fp32 weights, packed 16k and 32k-token rows, chunked LM head vs full logits (`SFTModule.lm_loss`).
3. `memory`: Qwen3-4B shapes with 2 and 4 layers, a 32k SFT row and a 65,536-token RL micro-batch through the real
   losses (`SFTModule`, `RubricRLModule.compute_loss`) and backward, peak memory extrapolated to 36 layers.
4. `precision`: the fraction of weights one AdamW step at lr 1e-6 changes under each shipped precision setting.
5. `rl_step`: one RL step on fixed synthetic rollouts with 1 vs 4 micro-batches under no strategy, FSDP2 and
   DeepSpeed ZeRO-2/3 on one GPU (Lightning `Trainer` + `RubricRLModule`): the same gradient norm and update.
   4 and 5 run in one subprocess per strategy (`qed_lightning.gpu_check.rl_step`).
6. `logprob_gap`: the trainer's log-probs (fp32 weights, bf16 autocast, chunked LM head) against a plain bf16 HF
   forward of the same weights (what a bf16 sampler computes).
7. `flash_attn`: when `flash_attn` imports, `attn_implementation="flash_attention_2"` (the paper configs') against
   sdpa on the same Qwen3-0.6B weights: a packed 4k-token row forward + backward through `SFTModule.lm_loss`
   (seconds, peak memory, loss, gradients), and its logits against each document run alone; skipped otherwise,
   with the reason.

Each section runs in processes of its own within a time budget (`measure.GPU_BUDGETS`, printed by the script with
the time each used); a section past its budget is cut and reported as cut, and the run goes on.

The GPU machine has torch, transformers and Lightning but no network, vLLM, DeepSpeed or flash-attn: DeepSpeed and
its pure-Python dependencies travel as wheels (`scripts/gpu_check_wheels.sh`), and attention is sdpa (section 7 is
skipped there). `--dry-run` runs every measurement with tiny shapes on CPU (DeepSpeed's CPU accelerator, gloo), so
the code is tested here.
"""
