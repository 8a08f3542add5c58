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
    return build_fixtures(tmp_path_factory.mktemp("realdata"))


def build_fixtures(root):
    """Write under `root` the directories and files a user would pass: chat_lm, same_rm, other_rm, multi_rm (models), uf
    (a save_to_disk DatasetDict with train_prefs / test_prefs: 40 + 12 rows, every fifth train row a tie), study (the
    relabelled AlpacaFarm .jsonl), pythia (a Pythia-style LM for it), texts (prompt/chosen/rejected text .jsonl)."""
    import datasets
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

    rng = random.Random(0)
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
    other = BertForSequenceClassification(BertConfig(**bert, num_labels=1))
    torch.nn.init.normal_(other.classifier.weight, std=1.0)  # rewards spread over ~1, not ~1e-3 (BERT's init): real preferences
    other.save_pretrained(root / "other_rm")
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


def test_study_alpaca_farm_rows_split_at_the_prompt_and_drop_ties(fixtures):
    from tasks import make_task

    t = make_task("alpaca_farm", model=str(fixtures / "pythia"), reward_model=str(fixtures / "other_rm"),
                  dataset=str(fixtures / "study.jsonl"))
    rows = [json.loads(line) for line in open(fixtures / "study.jsonl")]
    # 30 rows, every sixth a tie (5); no eval split in a file: the first fifth of the 30 distinct prompts (6) evaluate
    assert (t.info["dataset_rows"], t.info["dropped_ties"], len(t.eval_prompts), len(t.train_prompts)) == (30, 5, 6, 24)
    assert t.pad_token_id == len(t.tokenizer) - 1 != t.eos_token_id  # Pythia has no pad token: "[PAD]" added
    tok = t.tokenizer
    first = rows[6]  # the first row whose prompt trains (rows 0-5 hold the eval prompts)
    assert t.train_prompts[0] == tok(first["prompt"])["input_ids"]  # the Pythia-SFT prompt, verbatim
    pair = t.preference_data[0]
    response = first["y_w"][len(first["prompt"]):]  # "... words<|endoftext|>": the response and its EOS
    assert pair["prompt_ids"] == t.train_prompts[0] and pair["chosen_ids"] == tok(response, add_special_tokens=False)["input_ids"]
    assert pair["chosen_ids"][-1] == t.eos_token_id and len(t.preference_data) == 30 - 5 - 5  # ties, then the eval prompts' pairs
    assert t.info["reward_model"].endswith("(text pair)") and t.gold_reward is t.proxy_reward


def test_study_rows_that_do_not_start_with_their_prompt_split_at_the_assistant_tag():
    from tasks.preferences import tokenize_pairs

    tok = chat_tokenizer()
    row = {"prompt": "<|prompter|>name a fruit<|endoftext|><|assistant|>", "y_w": "<|prompter|>name a fruit <|endoftext|><|assistant|>apple",
           "y_l": "stone", "y_w_score": 2.0, "y_l_score": 1.0}
    out, counts = tokenize_pairs(rows(row), "hand", tok, chat=False)
    ids = tok.convert_tokens_to_ids
    assert out["status"] == ["malformed"] and counts["malformed"] == 1  # y_l has neither the prompt nor the tag
    out, counts = tokenize_pairs(rows(row | {"y_l": "<|prompter|>x<|assistant|>stone"}), "hand", tok, chat=False)
    assert out["status"] == ["ok"] and out[0]["chosen_ids"] == ids(["apple", "</s>"]) and out[0]["rejected_ids"] == ids(["stone", "</s>"])


def test_retokenised_reward_equals_the_model_on_the_same_texts(fixtures, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import tasks.reward_models as rm
    from common import pad_rows

    tok = AutoTokenizer.from_pretrained(fixtures / "chat_lm")
    ids = tok.convert_tokens_to_ids
    chats = [[{"role": "user", "content": "name a fruit"}], [{"role": "user", "content": "why is the sky blue"}]]
    prompts = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
               for m in chats]
    sources = {tuple(p): m for p, m in zip(prompts, chats)}
    queries = prompts + [ids(["<|user|>", "why", "</s>", "<|assistant|>"])]  # not registered: decoded, specials skipped -> "why"
    responses = [ids(["apple", "</s>"]), ids(["it", "is", "water", "very", "a", "cold", "day"])[:5], ids(["yes", "</s>", "<pad>"])[:2]]
    q, r = pad_rows(queries, tok.pad_token_id, left=True), pad_rows(responses, tok.pad_token_id, left=False)
    monkeypatch.setattr(rm, "RM_BATCH", 2)  # two forwards, the second a smaller batch
    reward = rm.ExternalReward(str(fixtures / "other_rm"), tok, "cpu", sources)
    assert reward.mode == "text pair"
    bert_tok = AutoTokenizer.from_pretrained(fixtures / "other_rm")
    bert = AutoModelForSequenceClassification.from_pretrained(fixtures / "other_rm").eval()
    texts = [("name a fruit", "apple"), ("why is the sky blue", "it is water very a"), ("why", "yes")]
    assert reward.texts(q, r)[1] == [y for _, y in texts]
    with torch.no_grad():  # each text pair alone, as a user of the reward model would score it
        direct = torch.stack([bert(**bert_tok(x, y, return_tensors="pt")).logits[0, 0] for x, y in texts])
    torch.testing.assert_close(reward(q, r), direct, atol=1e-5, rtol=1e-5)

    # the same tokenizer: ids pass straight through, and score what decoding and re-rendering the chat would score
    same = rm.ExternalReward(str(fixtures / "same_rm"), tok, "cpu", sources)
    retok = rm.ExternalReward(str(fixtures / "same_rm"), tok, "cpu", sources, pass_through=False)
    assert (same.mode, retok.mode) == ("pass-through", "chat template")
    finished = [0, 2]  # the chat template closes every turn with EOS: only finished responses read the same
    torch.testing.assert_close(same(q, r)[finished], retok(q, r)[finished], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(same(q, r), reward(q, r))


def test_one_line_errors_before_any_model_loads(fixtures, tmp_path):
    from tasks import make_task

    (tmp_path / "no_rejected.jsonl").write_text('{"prompt": "why", "chosen": "yes"}\n')
    cases = [(dict(name="ultrafeedback"), "--task ultrafeedback needs --model"),
             (dict(name="alpaca_farm", model=str(fixtures / "pythia")), "--task alpaca_farm needs --reward-model"),
             (dict(name="ultrafeedback", model=str(fixtures / "chat_lm"), reward_model=str(fixtures / "multi_rm")),
              "has 2 outputs \\(num_labels\\): a reward model must have exactly one"),
             (dict(name="ultrafeedback", model=str(fixtures / "chat_lm"), reward_model="nobody/no-such-rm-cleanpref"),
              "hub is not reachable"),
             (dict(name="ultrafeedback", model=str(fixtures / "chat_lm"), reward_model=str(fixtures / "other_rm"),
                   dataset="nobody/no-such-data-cleanpref"), "hub is not reachable"),
             (dict(name="ultrafeedback", model=str(fixtures / "chat_lm"), reward_model=str(fixtures / "other_rm"),
                   dataset=str(tmp_path / "no_rejected.jsonl")), "lacks columns \\['rejected'\\]"),
             (dict(name="min_length", dataset=str(tmp_path / "no_rejected.jsonl")), "lacks columns \\['rejected'\\]"),
             (dict(name="min_length", max_length=64), "pass --dataset too"),
             (dict(name="bandit_r1", reward_model=str(fixtures / "other_rm")), "token bandit with its own true reward")]
    for kwargs, message in cases:
        with pytest.raises(SystemExit, match=message) as err:
            make_task(**kwargs)
        assert "\n" not in str(err.value)
    out = run("dpo", tmp_path, "--task", "ultrafeedback", "--model", str(fixtures / "chat_lm"))
    assert one_line_error(out) == "--task ultrafeedback has no tuned defaults: pass --num-iterations and --learning-rate"


def test_dpo_trains_on_ultrafeedback_rows_through_dataset(fixtures, tmp_path):
    out = run("dpo", tmp_path, "--task", "ultrafeedback", "--model", str(fixtures / "chat_lm"), "--dataset", str(fixtures / "uf"),
              "--reward-model", str(fixtures / "other_rm"), "--gold-reward-model", str(fixtures / "same_rm"),
              "--num-iterations", "12", "--eval-every", "6", "--learning-rate", "3e-3", "--batch-size", "8", "--minibatch-size", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    # 40 train_prefs rows, every fifth a tie; the 12 test_prefs prompts evaluate
    assert "40 rows -> 32 pairs; dropped 8 ties" in out.stdout and "12 eval prompts (split test_prefs)" in out.stdout
    _, rows = metrics_of(tmp_path, "dpo", "ultrafeedback")
    assert [r["iteration"] for r in rows] == list(range(13)) and rows[-1]["samples"] == 2 * 96  # responses: 2 per pair
    assert all(EVAL_KEYS <= set(rows[i]) for i in (0, 6, 12)) and rows[0]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    # learning: three passes over the 32 pairs. Measured (seed 1): accuracy 0.42 over iterations 1-3 -> 1.00 over 10-12,
    # loss 0.693 -> 0.504; the thresholds leave room for float differences across machines
    acc, loss = ([r[k] for r in rows[1:]] for k in ("rewards/accuracies", "train/loss"))
    assert sum(acc[:3]) / 3 < 0.7 and sum(acc[-3:]) / 3 > 0.9
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.1


def test_online_dpo_trains_with_an_external_reward_model(fixtures, tmp_path):
    out = run("online_dpo", tmp_path, "--task", "ultrafeedback", "--model", str(fixtures / "chat_lm"), "--dataset",
              str(fixtures / "uf"), "--reward-model", str(fixtures / "other_rm"), "--num-iterations", "2", "--eval-every", "1",
              "--learning-rate", "1e-3", "--batch-size", "8", "--minibatch-size", "4", "--max-prompt-length", "24",
              "--max-length", "40")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "other_rm (text pair)" in out.stdout and "eval/gold_reward is the proxy's score" in out.stdout
    _, rows = metrics_of(tmp_path, "online_dpo", "ultrafeedback")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["samples"] == 16
    assert all(r["eval/gold_reward"] == r["eval/proxy_reward"] for r in rows)  # no --gold-reward-model: the proxy judges
    assert "objective/proxy_reward" in rows[-1] and all(abs(v) < 1e6 for v in rows[-1].values())


def test_a_length_task_takes_a_dataset_and_an_external_reward_model(fixtures):
    from common import pad_rows
    from tasks import make_task

    base = make_task("min_length")
    t = make_task("min_length", dataset=str(fixtures / "texts.jsonl"), reward_model=str(fixtures / "other_rm"),
                  max_prompt_length=20, max_length=30)
    rows = [json.loads(line) for line in open(fixtures / "texts.jsonl")]
    tok = t.tokenizer
    assert t.eval_prompts == base.eval_prompts and t.max_new_tokens == base.max_new_tokens  # evaluation is the task's
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]  # this tokenizer splits the fixture's words: 9 to 25 tokens
    assert t.train_prompts == list(map(list, dict.fromkeys(tuple(p[-20:]) for p in prompts)))  # each prompt's last 20 tokens
    assert t.info["prompts_truncated"] == sum(len(p) > 20 for p in prompts) > 0
    assert len(t.preference_data) + t.info["dropped_identical"] == 40  # text rows: no scores, no ties
    assert all(len(p) + max(len(c), len(r)) <= 30 for p, c, r in zip(*(t.preference_data[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
    assert t.info["reward_model"].endswith("(text pair)") and t.reward_model_path is None  # ppo's critic starts from pi_ref
    q = pad_rows(t.eval_prompts[:2], t.pad_token_id, left=True)
    y = pad_rows([[5, 6, t.eos_token_id], [5, 6, 7, 8]], t.pad_token_id, left=False)
    assert t.gold_reward(q, y).tolist() == [-2.0, -4.0]  # still the task's gold: minus the tokens before EOS
