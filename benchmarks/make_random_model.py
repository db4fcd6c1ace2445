"""Write a random-weight Llama model folder of a given shape, for GPU benchmarks without downloads.

    python benchmarks/make_random_model.py /tmp/llama-1b --shape 1b --tokenizer TOKENIZER_DIR

Throughput does not depend on the weights' values when every request runs to its
max_tokens (ignore_eos), so a random model of a real shape measures the engine honestly.
"""

from __future__ import annotations

import argparse

SHAPES = {   # hidden, intermediate, layers, heads, kv_heads (Llama-3.2-1B, Llama-3.1-8B)
    "1b": (2048, 8192, 16, 32, 8),
    "8b": (4096, 14336, 32, 32, 8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder to copy in")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    hidden, inter, layers, heads, kv_heads = SHAPES[args.shape]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"parameters) to {args.out}")


if __name__ == "__main__":
    main()
