"""Real preference data and external reward models (issue 14), on local fixtures in the hub schemas: no hub, CPU.

Fixtures: a tiny chat causal LM (word-level tokenizer with a Zephyr-style chat template), UltraFeedback-binarized
rows (`prompt`, `prompt_id`, `chosen`/`rejected`/`messages` as message lists, `score_chosen`/`score_rejected`; splits
train_prefs / test_prefs), the study's relabelled AlpacaFarm rows (`prompt`, `y_w`, `y_l`, scores), a tiny BERT
sequence classifier with a DIFFERENT (WordPiece) tokenizer, a Llama sequence classifier with the policy's tokenizer.
"""

import json
import random

import pytest
import torch
from conftest import EVAL_KEYS, metrics_of, run

WORDS = ("the a sea sky blue red fruit poem brick house write list explain name three uses why is of about short long answer "
         "good bad very it yes no apple stone water cold warm day night").split()
SPECIALS = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|prompter|>", "<|endoftext|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIALS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def uf_row(rng, i, tie=False):
    """One UltraFeedback-binarized row, in the hub's columns and order."""
    prompt = sentence(rng, rng.randint(3, 8))
    chosen, rejected = sentence(rng, rng.randint(2, 10)), sentence(rng, rng.randint(2, 10))
    score_chosen = float(rng.choice([7.0, 8.5, 9.0]))
    return {"prompt": prompt, "prompt_id": f"{i:064x}",
            "chosen": [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}],
            "rejected": [{"content": prompt, "role": "user"}, {"content": rejected, "role": "assistant"}],
            "messages": [{"content": prompt, "role": "user"}, {"content": chosen, "role": "assistant"}],
            "score_chosen": score_chosen, "score_rejected": score_chosen if tie else score_chosen - rng.choice([1.0, 2.5, 4.0])}


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    """Directories and files as a user passes them: chat_lm, same_rm, other_rm, multi_rm (models), uf (a save_to_disk
    DatasetDict with train_prefs / test_prefs: 40 + 12 rows, every fifth train row a tie), study (relabelled AlpacaFarm
    .jsonl), pythia (a Pythia-style LM for it), texts (prompt/chosen/rejected text .jsonl)."""
    import datasets
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

    root, rng = tmp_path_factory.mktemp("realdata"), random.Random(0)
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(root / "chat_lm")
    LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)).save_pretrained(root / "same_rm")
    for d in ("chat_lm", "same_rm"):
        tokenizer.save_pretrained(root / d)

    (root / "bert").mkdir()  # a different tokenizer: lower-case WordPiece, [CLS] x [SEP] y [SEP], no EOS, no chat template
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<", ">", "|", "/"]
                                                       + sorted(set(WORDS)) + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    bert_tok = BertTokenizerFast(str(root / "bert" / "vocab.txt"), model_max_length=128)
    bert = dict(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=128)
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(**bert, num_labels=1)).save_pretrained(root / "other_rm")
    BertForSequenceClassification(BertConfig(**bert, num_labels=2)).save_pretrained(root / "multi_rm")
    for d in ("other_rm", "multi_rm"):
        bert_tok.save_pretrained(root / d)

    train = [uf_row(rng, i, tie=i % 5 == 4) for i in range(40)]
    test = [uf_row(rng, 100 + i) for i in range(12)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(train),
                          "test_prefs": datasets.Dataset.from_list(test)}).save_to_disk(root / "uf")

    texts = [{"prompt": r["prompt"], "chosen": r["chosen"][1]["content"], "rejected": r["rejected"][1]["content"]} for r in train]
    (root / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))

    study = []  # the study's relabelled AlpacaFarm: y_w / y_l are the Pythia-SFT prompt followed by the response
    for i in range(30):
        prompt = f"<|prompter|>{sentence(rng, 4)}<|endoftext|><|assistant|>"
        y_w, y_l = sentence(rng, rng.randint(2, 6)), sentence(rng, rng.randint(2, 6))
        score = -1.0 if i % 6 == 5 else 1.5
        study.append({"prompt": prompt, "y_w": prompt + y_w + "<|endoftext|>", "y_l": prompt + y_l + "<|endoftext|>",
                      "y_w_score": 2.0, "y_l_score": 2.0 if i % 6 == 5 else score})
    (root / "study.jsonl").write_text("".join(json.dumps(r) + "\n" for r in study))
    pythia_tok = chat_tokenizer()
    pythia_tok.chat_template = None
    pythia_tok.eos_token, pythia_tok.pad_token = "<|endoftext|>", None  # as Pythia's: EOS, no pad, no template
    torch.manual_seed(2)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(pythia_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=256, eos_token_id=pythia_tok.eos_token_id,
                                     bos_token_id=pythia_tok.eos_token_id)).save_pretrained(root / "pythia")
    pythia_tok.save_pretrained(root / "pythia")
    return root


def one_line_error(out):
    """The last stderr line of a failed run, after checking there is no traceback."""
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return out.stderr.strip().splitlines()[-1]


# ---- tokenisation: the chat-template boundary, truncation, ties (hand-made rows) -------------------------------------


def rows(*dicts):
    import datasets

    return datasets.Dataset.from_list(list(dicts))


def chat(prompt, chosen, rejected, sc=None, sr=None):
    row = {"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
           "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]}
    return row | ({"score_chosen": sc, "score_rejected": sr} if sc is not None else {})


def test_chat_response_is_exactly_the_final_assistant_turn():
    from tasks.preferences import tokenize_pairs

    tok = chat_tokenizer()
    multi = {"chosen": [{"role": "system", "content": "be short"}, {"role": "user", "content": "name a fruit"},
                        {"role": "assistant", "content": "apple"}, {"role": "user", "content": "why"},
                        {"role": "assistant", "content": "it is red"}],
             "rejected": [{"role": "system", "content": "be short"}, {"role": "user", "content": "name a fruit"},
                          {"role": "assistant", "content": "apple"}, {"role": "user", "content": "why"},
                          {"role": "assistant", "content": "no"}]}
    out, counts = tokenize_pairs(rows(multi), "hand", tok, chat=True)
    ids = tok.convert_tokens_to_ids
    # the template renders "...<|user|>\nwhy</s>\n<|assistant|>\n" + "it is red</s>\n": the prompt keeps every earlier turn
    assert out[0]["prompt_ids"] == ids(["<|system|>", "be", "short", "</s>", "<|user|>", "name", "a", "fruit", "</s>",
                                        "<|assistant|>", "apple", "</s>", "<|user|>", "why", "</s>", "<|assistant|>"])
    assert out[0]["chosen_ids"] == ids(["it", "is", "red", "</s>"])  # the assistant turn and its EOS, nothing after
    assert out[0]["rejected_ids"] == ids(["no", "</s>"])
    full = tok.apply_chat_template(multi["chosen"], tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == out[0]["prompt_ids"] + out[0]["chosen_ids"]
    assert counts["ok"] == 1


def test_truncation_ties_and_drops_are_counted():
    from tasks.preferences import tokenize_pairs

    tok = chat_tokenizer()
    ds = rows(chat("why", "yes", "no", 8.0, 8.0),                           # tie: dropped
              chat("name a fruit", "apple", "stone", 9.0, 3.0),              # ok, untouched
              chat("the sea the sky the day", "blue", "red", 9.0, 3.0),      # prompt 9 tokens -> its last 6
              chat("why", "it is very very good", "no", 9.0, 3.0),           # chosen cut to fit max_length
              chat("why", "yes it is very", "yes it is very good", 9.0, 3.0),  # identical once cut
              {"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}],
               "score_chosen": 9.0, "score_rejected": 1.0})                   # no prompt: malformed
    out, counts = tokenize_pairs(ds, "hand", tok, chat=True, max_prompt_length=6, max_length=8)
    ids = tok.convert_tokens_to_ids
    assert out["status"] == ["tie", "ok", "ok", "ok", "identical", "malformed"]
    assert out[1]["prompt_ids"] == ids(["<|user|>", "name", "a", "fruit", "</s>", "<|assistant|>"]) and out[1]["chosen_ids"] == ids(["apple", "</s>"])
    assert out[2]["prompt_ids"] == ids(["the", "sky", "the", "day", "</s>", "<|assistant|>"])  # the END of its 9 tokens
    # "why": [<|user|>, why, </s>, <|assistant|>] = 4 tokens, room 8 - 4 = 4: "it is very very good </s>" keeps its first 4
    assert out[3]["chosen_ids"] == ids(["it", "is", "very", "very"]) and out[3]["rejected_ids"] == ids(["no", "</s>"])
    assert out[4]["chosen_ids"] == out[4]["rejected_ids"] == ids(["yes", "it", "is", "very"])
    assert (counts["tie"], counts["identical"], counts["malformed"]) == (1, 1, 1)
    assert counts["prompts_truncated"] == 1 and counts["responses_truncated"] == 3  # row 3's chosen, row 4's both

    texts = rows({"prompt": "name a fruit", "chosen": "apple", "rejected": "stone"})  # text rows: prompt verbatim, EOS appended
    out, _ = tokenize_pairs(texts, "hand", tok, chat=False)
    assert out[0]["prompt_ids"] == ids(["name", "a", "fruit"]) and out[0]["chosen_ids"] == ids(["apple", "</s>"])
