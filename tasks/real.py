"""The study's full-scale settings (docs/paper.md 3c) as named tasks, and real data on the length tasks.

- ultrafeedback: a chat policy (--model, e.g. Zephyr's Mistral-7B SFT) on UltraFeedback binarized
  (HuggingFaceH4/ultrafeedback_binarized: `train_prefs` pairs and prompts, `test_prefs` eval prompts; ties dropped), or
  the study's relabelled copy through --dataset. Prompts and responses go through the model's chat template.
- alpaca_farm: the study's Pythia SFT policy (--model) on its relabelled AlpacaFarm pairs
  (Asap7772/relabeled_alpacafarm_pythiasft_20K_preference_data, splits train / test), prompts in the Pythia-SFT
  template `<|prompter|>{instruction}[\\n{input}]<|endoftext|><|assistant|>`.
Both need --model and --reward-model (the proxy reward: a sequence classifier with one output); --gold-reward-model
scores eval/gold_reward (default: the --reward-model, said so when the task loads). Nothing is built or cached here:
the policy is the --model checkpoint (loaded in fp32, a "[PAD]" row added where its tokenizer has no pad token).
- Preference pairs: --dataset (default the one above), split `train_prefs` / `train` unless the spec names one
  (`id@split`); tokenised and truncated by tasks/preferences.py with --max-prompt-length P (default 512 / 128) and
  --max-length L (default 1024 / 384). Responses are sampled up to L - P new tokens (512 / 256, the study's 256 for
  AlpacaFarm).
- Train prompts (on-policy scripts): the dataset's, ties included. Eval prompts: the dataset's `test_prefs` / `test`
  split; where it has none, the first fifth of its prompts (at most 256), whose pairs then leave training. --prompts
  replaces both as on the length tasks: its first fifth (at most 256) evaluates, the rest trains.

On the length tasks, --dataset replaces the preference pairs and the train prompts (eval prompts stay the task's), and
--reward-model / --gold-reward-model replace the proxy / gold reward; their builds are untouched (the proxy reward
model is still trained and cached, then unused).
"""

import json

from tasks import Task, _hub_error, _resolve, _with_pad_token_id, dataset_splits, load_rows, load_split, parse_dataset_spec, prompt_text
from tasks.preferences import encode_prompt, load_pairs, schema_of, tokenize_pairs, unique_prompts
from tasks.reward_models import ExternalReward, check_reward_model

REAL = {
    "ultrafeedback": dict(dataset="HuggingFaceH4/ultrafeedback_binarized", train_splits=("train_prefs", "train"),
                          eval_splits=("test_prefs", "test"), chat=True, max_prompt_length=512, max_length=1024,
                          example_model="HuggingFaceH4/mistral-7b-sft-beta"),
    "alpaca_farm": dict(dataset="Asap7772/relabeled_alpacafarm_pythiasft_20K_preference_data", train_splits=("train",),
                        eval_splits=("test", "val", "validation"), chat=False, max_prompt_length=128, max_length=384,
                        example_model="runs/pythia_sft/model (algos/sft.py on tatsu-lab/alpaca_farm)"),
}
MAX_EVAL_PROMPTS = 256


def _check_lengths(max_prompt_length, max_length):
    if max_prompt_length is not None and max_prompt_length < 1:
        raise SystemExit(f"--max-prompt-length must be >= 1, got {max_prompt_length}")
    if max_length is not None and max_prompt_length is not None and max_length <= max_prompt_length:
        raise SystemExit(f"--max-length ({max_length}) must exceed --max-prompt-length ({max_prompt_length}) to leave room for a response")


def check_overrides(name, dataset, reward_model, gold_reward_model, max_prompt_length, max_length, min_pairs=0):
    """One-line errors for real-data arguments an embedded task cannot take, before it builds (which may train); min_pairs:
    the pairs per iteration an offline script needs (--batch-size), at most the --dataset's rows."""
    given = [f"--{k}" for k, v in [("dataset", dataset), ("reward-model", reward_model), ("gold-reward-model", gold_reward_model),
                                   ("max-prompt-length", max_prompt_length), ("max-length", max_length)] if v is not None]
    if given and name.startswith("bandit"):
        raise SystemExit(f"{name} is a token bandit with its own true reward; {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the length tasks and to "
                         f"the real tasks (ultrafeedback, alpaca_farm)")
    if (max_prompt_length is not None or max_length is not None) and dataset is None:
        raise SystemExit("--max-prompt-length and --max-length truncate the rows of --dataset on a length task: pass --dataset too")
    _check_lengths(max_prompt_length, max_length)
    for path, what in ((reward_model, "reward model"), (gold_reward_model, "gold reward model")):
        if path is not None:
            check_reward_model(path, what)
    if dataset is not None:
        rows = load_split(dataset, "train")
        schema_of(rows, dataset)
        if len(rows) < min_pairs:
            raise SystemExit(f"--batch-size {min_pairs}: --dataset {dataset} has {len(rows)} preference pairs; pass at most that, or more pairs")


def _rewards(tokenizer, device, sources, reward_model, gold_reward_model):
    """(proxy, gold) ExternalRewards; the gold one is the proxy object itself when they are the same model."""
    proxy = ExternalReward(reward_model, tokenizer, device, sources, "reward model") if reward_model else None
    if gold_reward_model is None or gold_reward_model == reward_model:
        return proxy, proxy
    return proxy, ExternalReward(gold_reward_model, tokenizer, device, sources, "gold reward model")


def _critic_path(proxy, tokenizer):
    """The reward model's path where a critic (ppo.py's value model) can start from it: same tokenizer, and its checkpoint
    has a row for the policy's pad id; else None (the critic starts from pi_ref)."""
    return proxy.path if proxy.pass_through and proxy.rows_on_disk > tokenizer.pad_token_id else None


def override(task: Task, dataset, reward_model, gold_reward_model, max_prompt_length, max_length) -> Task:
    """An embedded length task with its pairs and train prompts replaced by --dataset, its rewards by external models."""
    sources = {}
    if dataset is not None:
        split = parse_dataset_spec(dataset)[2] or "train"
        pairs, prompts, summary = load_pairs(dataset, split, task.tokenizer, False, max_prompt_length, max_length)
        task.train_prompts, sources = unique_prompts(prompts)
        task.preference_data = pairs.remove_columns("source")
        task.info.update(summary, dataset=dataset, train_prompts=len(task.train_prompts))
    proxy, gold = _rewards(task.tokenizer, task.device, sources, reward_model, gold_reward_model)
    if proxy is not None:
        task.proxy_reward, task.reward_model_path = proxy, _critic_path(proxy, task.tokenizer)
        task.info["reward_model"] = proxy.describe()
    if gold_reward_model is not None:
        task.gold_reward = gold
        task.info["gold_reward_model"] = gold.describe()
    if reward_model or gold_reward_model:
        own = "the task's own"
        print(f"[cleanpref] {task.name}: proxy reward {task.info.get('reward_model', own)}, gold reward {task.info.get('gold_reward_model', own)}")
    return task


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    src = _resolve(model, "model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise _hub_error(model, "model", err) from None
    return _with_pad_token_id(tokenizer), src


def make(name, device, model, prompts, dataset, reward_model, gold_reward_model, max_prompt_length, max_length) -> Task:
    r = REAL[name]
    if not model:
        raise SystemExit(f"--task {name} needs --model: the policy to fine-tune, a local directory or hub id (e.g. {r['example_model']})")
    if not reward_model:
        raise SystemExit(f"--task {name} needs --reward-model: the proxy reward, a sequence classifier with one output (a local "
                         f"directory or hub id, e.g. one trained by algos/reward_model.py)")
    plen, length = max_prompt_length or r["max_prompt_length"], max_length or r["max_length"]
    _check_lengths(plen, length)
    for path, what in ((reward_model, "reward model"), (gold_reward_model, "gold reward model")):
        if path is not None:
            check_reward_model(path, what)
    tokenizer, policy_path = _load_tokenizer(model)
    spec = dataset or r["dataset"]
    splits = dataset_splits(spec)
    train_split = parse_dataset_spec(spec)[2] or next((s for s in r["train_splits"] if s in splits), splits[0])
    pairs, train_rows, summary = load_pairs(spec, train_split, tokenizer, r["chat"], plen, length)
    train_prompts, sources = unique_prompts(train_rows)
    eval_split = next((s for s in r["eval_splits"] if s in splits and s != train_split), None)
    if prompts:  # as on the length tasks: the first fifth evaluates, the rest trains
        encoded = [encode_prompt(prompt_text(row), tokenizer, r["chat"]) for row in load_rows(prompts, "train", [])]
        ids, sources_p = unique_prompts([(ids[-plen:], json.dumps(messages or text)) for ids, text, messages in encoded])
        n_eval = min(MAX_EVAL_PROMPTS, len(ids) // 5)
        if n_eval == 0:
            raise SystemExit(f"prompts {prompts!r} has {len(ids)} distinct prompts: need at least 5 (a fifth evaluates)")
        eval_prompts, train_prompts, where = ids[:n_eval], ids[n_eval:], f"the first {n_eval} of {prompts}"
        sources.update(sources_p)
    elif eval_split is not None:
        rows, _ = tokenize_pairs(load_split(spec, eval_split), spec, tokenizer, r["chat"], plen, length)
        keep = [(p, s) for p, s, st in zip(rows["prompt_ids"], rows["source"], rows["status"]) if st not in ("malformed", "prompt_too_long")]
        eval_prompts, eval_sources = unique_prompts(keep)
        sources.update(eval_sources)
        where = f"split {eval_split}"
    else:  # hold out the first fifth of the prompts, and their pairs
        n_eval = min(MAX_EVAL_PROMPTS, len(train_prompts) // 5)
        eval_prompts, train_prompts, where = train_prompts[:n_eval], train_prompts[n_eval:], f"the first {n_eval} prompts of {train_split}"
        held = {tuple(p) for p in eval_prompts}
        pairs = pairs.filter(lambda p: tuple(p) not in held, input_columns="prompt_ids")
        summary["pairs"] = len(pairs)
    if not eval_prompts or not train_prompts or len(pairs) == 0:
        raise SystemExit(f"{name}: dataset {spec!r} leaves {len(train_prompts)} train prompts, {len(eval_prompts)} eval prompts and "
                         f"{len(pairs)} pairs; it needs some of each (give more rows, an eval split, or --prompts)")
    proxy, gold = _rewards(tokenizer, device, sources, reward_model, gold_reward_model)
    info = dict(summary, dataset=spec, train_split=train_split, eval_prompts_from=where, train_prompts=len(train_prompts),
                eval_prompts=len(eval_prompts), max_prompt_length=plen, max_length=length, reward_model=proxy.describe(),
                gold_reward_model=gold.describe())
    print(f"[cleanpref] {name}: policy {model}; {len(train_prompts)} train prompts, {len(eval_prompts)} eval prompts ({where}); "
          f"responses up to {length - plen} tokens; proxy reward {proxy.describe()}; gold reward {gold.describe()}"
          + ("" if gold_reward_model else " (no --gold-reward-model: eval/gold_reward is the proxy's score)"))
    return Task(name=name, tokenizer=tokenizer, policy_path=policy_path, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, max_new_tokens=length - plen, temperature=1.0, train_prompts=train_prompts,
                eval_prompts=eval_prompts, preference_data=pairs.remove_columns("source"), proxy_reward=proxy, gold_reward=gold,
                device=device, reward_model_path=_critic_path(proxy, tokenizer), info=info)
