"""Make a small random-weight Llama checkpoint whose head counts divide by 2 (for TP tests).

SmolLM2's 9 query heads cannot be split over 2 ranks, so the tensor-parallel comparison uses
this: 8 query heads, 4 KV heads, head size 128, 4 layers, random weights with a fixed seed,
and SmolLM2's tokenizer (so prompts are real text).

    python benchmarks/make_tiny_llama.py OUT_DIR [--tokenizer SMOLLM2_DIR]
"""

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer", default=None, help="folder with a tokenizer (default: SmolLM2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.tokenizer is None:
        from vllm_turboquant.models import resolve_model
        args.tokenizer = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2048,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Wider-than-default init so logits are not flat and greedy tokens are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: 4 layers, 8 q heads, 4 kv heads, head 128")


if __name__ == "__main__":
    main()
