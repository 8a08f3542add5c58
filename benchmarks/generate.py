"""Sampling throughput: cleanpref's `common.generate` vs Hugging Face `model.generate`, side by side.

    OMP_NUM_THREADS=1 python benchmarks/generate.py

A tiny Llama-style model (random weights; speed does not depend on them), left-padded prompts of
mixed length, 32 new tokens at temperature 1 with EOS disabled so every call makes the same number
of tokens. The two are interleaved in one process (medians of --repeats rounds). Also checks that
the helper's sampling log-probs equal a teacher-forced recompute (`common.response_logprobs`).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import generate, response_logprobs  # noqa: E402

PAD = 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cuda", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = "cuda" if a.cuda else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).to(device).eval()
    print(f"tiny Llama {sum(x.numel() for x in model.parameters()) / 1e6:.2f}M params, {device}, threads={torch.get_num_threads()}, "
          f"{a.new_tokens} new tokens\n")
    print("| batch | helper tok/s | generate tok/s | helper / generate | max abs(sampling logp - recompute) |\n|---|---|---|---|---|")
    for b in a.batch_sizes:
        lengths = torch.randint(4, 17, (b,), generator=torch.Generator().manual_seed(b))
        q = torch.full((b, 16), PAD, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            q[i, 16 - n:] = torch.randint(2, 512, (n,))
        q = q.to(device)
        g = torch.Generator(device).manual_seed(0)

        def ours():
            return generate(model, q, PAD, None, a.new_tokens, 1.0, g)

        def hf():
            return model.generate(q, attention_mask=(q != PAD).long(), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=PAD, eos_token_id=None)

        times = {"ours": [], "hf": []}
        ours(), hf()  # warm-up
        for _ in range(a.repeats):
            for k, fn in (("ours", ours), ("hf", hf)):
                if a.cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if a.cuda:
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        assert hf().shape[1] - q.shape[1] == a.new_tokens
        r, lp = ours()
        assert r.shape[1] == a.new_tokens
        with torch.no_grad():
            scored, _ = response_logprobs(model, q, r, PAD, None)
        err = (lp - scored).abs().max().item()
        tok = b * a.new_tokens
        t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
        print(f"| {b} | {tok / t_ours:.0f} | {tok / t_hf:.0f} | {t_hf / t_ours:.2f}x | {err:.1e} |")
    print(f"\nreproduce: OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/generate.py" + (" --cuda" if a.cuda else ""))


if __name__ == "__main__":
    main()
