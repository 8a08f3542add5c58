import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

PAD, EOS = 0, 1


def tiny_llama(vocab=40, hidden=32, layers=2, seed=0, **overrides):
    """A random-init Llama small enough for exact CPU tests (pad 0, EOS 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **overrides)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_lm():
    return tiny_llama()


INSTRUCTIONS = ["write a poem about the sea", "list three uses of a brick", "explain why the sky is blue",
                "summarize the text", "translate the sentence into french", "name a fruit that is red"]


@pytest.fixture(scope="session")
def local_pythia(tmp_path_factory):
    """A tiny Pythia-style model directory and AlpacaFarm-style prompts, as a user would pass them with
    --model / --prompts: GPT-NeoX architecture, fp16 weights, a tokenizer with EOS but no pad token.
    Its output head is zero, so it samples uniformly and ends a response with probability 1/V per token.
    Returns (model_dir, prompts_file, cache_dir): tests point CLEANPREF_CACHE at cache_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("local_pythia")
    rows = [{"instruction": INSTRUCTIONS[i % 6], "input": f"item {i}" if i % 2 else ""} for i in range(60)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(INSTRUCTIONS + ["item 0 1 2 3 4 5 6 7 8 9 ."], trainers.BpeTrainer(
        vocab_size=64, special_tokens=["<|endoftext|>", "<unk>", "<|prompter|>", "<|assistant|>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(cfg)
    torch.nn.init.zeros_(model.get_output_embeddings().weight)
    model.half().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", root / "prompts.jsonl", root / "cache"
