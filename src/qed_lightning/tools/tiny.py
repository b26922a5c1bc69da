"""Build a tiny, offline Qwen3 model and tokenizer for tests, demos and benchmarks.

Nothing is downloaded: a byte-level BPE tokenizer is trained with `tokenizers` on the bundled sample data (or on a
small embedded corpus when the samples are not found), and a randomly initialised `Qwen3ForCausalLM` is built from
a fixed seed. The same inputs always give the same files.

The chat template follows Qwen3-Thinking-2507: `<|im_start|>role\\n...<|im_end|>` turns, and the generation prompt
opens the assistant turn with `<think>\\n`, so the model writes its thinking, then `</think>`, then the proof.
`<think>`/`</think>` are added tokens that are *not* special, so they survive `skip_special_tokens` decoding
(vLLM and transformers both keep them in the text), exactly as in the real Qwen3 tokenizer.

vLLM's CPU attention kernel rejects head_dim 16, so every preset uses head_dim >= 32.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)

_EMBEDDED_CORPUS = """Generate a rigorous proof to the following question:
Prove that there are infinitely many primes. Suppose there are finitely many primes p_1, ..., p_k and consider
N = p_1 p_2 ... p_k + 1. Then N is not divisible by any p_i, so it has a prime factor not in the list.
This is a contradiction, hence the claim holds. Let $n$ be a positive integer. We prove by induction on $n$.
Therefore the inequality $a^2 + b^2 \\geq 2ab$ follows from $(a-b)^2 \\geq 0$. Equality holds iff $a = b$.
By the pigeonhole principle two of the numbers share a residue modulo $n$, so their difference is divisible by $n$.
Let the triangle $ABC$ have circumcircle $\\omega$; the angle bisector meets $BC$ at $D$.
### PROBLEM ### SUMMARY OF PREVIOUS ATTEMPT ### INSTRUCTIONS ### EXISTING SUMMARY ### LATEST CANDIDATE SOLUTION
<score>7</score><assessment>The proof is complete.</assessment><errors>None.</errors> <points>6 out of 7</points>
"""


@dataclass(frozen=True)
class TinyPreset:
    """Shape of a tiny Qwen3. `test` is what tests and demos use; `bench` is the ~20M model of the benchmarks."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


PRESETS = {
    "test": TinyPreset(128, 256, 2, 4, 2, 32, 512),
    "bench": TinyPreset(512, 1536, 6, 8, 4, 64, 2048),
}


# the tokenizer corpus is pinned to these files, so adding a sample file does not change the tiny tokenizer (and
# with it every tokenized length, loss and benchmark number measured on it)
CORPUS_FILES = ("fineproofs_sft.jsonl", "fineproofs_rl.jsonl", "imo_proofbench.jsonl", "proofbench.jsonl")


def _repo_samples() -> list[str]:
    root = Path(__file__).resolve().parents[3] / "data" / "samples"  # src/qed_lightning/tools/tiny.py -> repo
    return [str(root / name) for name in CORPUS_FILES if (root / name).exists()]


def _corpus_from_files(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                texts.extend(v for v in row.values() if isinstance(v, str))
                for message in row.get("messages", []) or []:
                    texts.append(message.get("content", ""))
    return texts


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def build_tiny(out_dir: str | Path, preset: str = "test", seed: int = 0, corpus_files: list[str] | None = None) -> Path:
    """Write a tiny Qwen3 model + tokenizer to `out_dir` and return the path."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    shape = PRESETS[preset]
    files = corpus_files if corpus_files is not None else _repo_samples()
    corpus = _corpus_from_files(files) if files else []
    corpus.append(_EMBEDDED_CORPUS)
    tokenizer = build_tokenizer(corpus, shape.vocab_size)

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny Qwen3 (%s preset, %.2fM parameters, vocab %d) written to %s",
             preset, n_params / 1e6, len(tokenizer), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qed-make-tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write the model and tokenizer into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", nargs="*", default=None,
                        help="JSONL files to train the tokenizer on (default: data/samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny(args.out_dir, preset=args.preset, seed=args.seed, corpus_files=args.corpus)


if __name__ == "__main__":
    main()
