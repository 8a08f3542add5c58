"""Synthetic length tasks (docs/paper.md 3b) at laptop scale: min_length, mode_length, skew_length.

The world (shared by the three tasks, cached once):
- A synthetic instruction language made in code: prompts ask for a story about one or two animals
  ("tell a story about the fox and the owl ."); a response is 1-8 template sentences about them
  (4-10 words each), the count drawn from a table with its mode at 3 and a tail that fits
  max_new_tokens = 64, then EOS. A story never opens with "then": every response starts with "the".
- A BPE tokenizer (`tokenizers`, vocab <= 512) trained on that corpus; pad ("<pad>") distinct from
  EOS ("<eos>"); saved in Hugging Face format.
- pi_ref: a 2-layer, 128-wide Llama trained from scratch by `algos/sft.py`'s `sft_train` (2 epochs, 4,000 stories).
- Two samples per train prompt from pi_ref (temperature 1): the raw material of the preference data.

Each task then labels those pairs with its gold reward (ties dropped) and trains a proxy reward model
(`algos/reward_model.py`, Bradley-Terry, initialised from pi_ref) on them; held-out accuracy is
reported. Response length = tokens before EOS (a response that never emits EOS counts all its
max_new_tokens tokens; it is truncated, not an error).
- min_length:  gold r = -length. The optimum (the empty response) is where pi_ref is unlikely (like R1).
- mode_length: gold r = -|length - L|, L the mode of the lengths of pi_ref's samples that ended (computed
  when the world is built and stored in its summary). The optimum is where pi_ref is likely (like R2).
- skew_length: min_length's reward, but every dataset completion is cut after its first
  k = max(1, floor(u * n)) sentences, u ~ U(0, 0.5) per completion, n its sentence count, and closed
  with EOS; gold scores are recomputed on the cut text. The data then covers only the short half of
  pi_ref's lengths; the proxy reward model is trained on that skewed data too.

Geometry (RECIPE v4). Claims 1 and 7 contrast a reward that peaks where pi_ref is unlikely with one that peaks where
it is likely, so each build records `ref_peak_share` (printed, and in task.info): the probability pi_ref gives to a
length within one token of the task's optimum (<= 1 for min_length and skew_length, L +- 1 for mode_length). It is
estimated on the 4,000 preference samples by `length_pmf`, from pi_ref's exact probability of stopping at each position
along its own samples: unbiased like counting, and it resolves 0.1% where counting 4,000 samples cannot.
Why v4: the data never holds an empty response, yet v3's pi_ref (1 epoch on 5,500 stories that opened with "the" or
"then", up to 10 sentences) ended at once 1.3% of the time: its prompts end with "." as does every sentence EOS
follows, and an underfitted model blurred the two. A sure first token ("the") cuts that to ~0.05%, and a second epoch
keeps pi_ref from looping (after 1 epoch some seeds ended only 81-89% of their samples); the shorter tail (8 sentences)
lets nearly every sample end within 64 tokens. The peak must stay rare but not absent: with 3,000 stories (0.046%) the
proxy reward model scored the empty response below a one-sentence story and online DPO stalled there on min_length
(gold -6.4 at 60 iterations, 3 of 3 seeds); an opening phrase ("once upon a time .", 0.01%) stalled it at the opening.
Measured (seed 0, CPU): pi_ref length mode 18, mean 24.1 +- 12.0 tokens, EOS rate 0.993; ref_peak_share 0.00092 on
min_length and skew_length (counted on 32,768 fresh samples: 25, 0.00076), 0.091 on mode_length (99x); proxy reward
models' held-out accuracy 0.995 / 0.984 / 0.994 (min / mode / skew). Build on a 2-core CPU:
the world 44 s (v3 31 s), a task ~12 s. How every objective does on this build: docs/study.md.

The study's version (Pythia SFT on AlpacaFarm prompts) runs through the same pipeline:
--model makes pi_ref a Hugging Face causal LM (loaded in fp32, a dedicated pad token added if it has
none, e.g. Pythia), --prompts replaces the story prompts with a dataset's (`prompt`, or AlpacaFarm's
`instruction` [+ `input`] in the Pythia-SFT template); responses run to 256 new tokens, the reward
model starts from pi_ref with lr 1e-5 for one epoch (REAL_MODEL), and building happens on the run's
device. On CPU it is tested with a tiny local GPT-NeoX directory (tests/conftest.py).

    python algos/sft.py --model EleutherAI/pythia-1.4b --dataset tatsu-lab/alpaca_farm:alpaca_instructions@sft \
        --response-column output --cuda --output-dir runs/pythia_sft
    python algos/online_dpo.py --task min_length --model runs/pythia_sft/model \
        --prompts tatsu-lab/alpaca_farm:alpaca_instructions@unlabeled --cuda
"""

import json
import random
from functools import partial

import torch

from tasks import Task, cached, fingerprint, load_causal_lm, load_rows, prompt_text, source_key, step_bar, summary_of, world_seed

ANIMALS = "fox owl cat dog bear wolf deer frog duck goat hare lion mole mouse otter pig rabbit seal sheep snake swan tiger toad whale".split()
PLACES = "forest river hill town field lake garden cave barn valley meadow bridge".split()
ACTS = "sees finds helps follows meets chases greets watches visits calls".split()
MOVES = "sleeps runs sings jumps waits hides eats swims laughs rests".split()
ADJS = "little old happy sleepy brave quiet clever tiny".split()
SENTENCE_COUNTS = [0.06, 0.17, 0.25, 0.2, 0.14, 0.09, 0.055, 0.035]  # P(n = 1..8): mode 3, a tail that fits 64 tokens
RECIPE = dict(version=4, seed=0, sft_examples=4000, train_prompts=2000, eval_prompts=256, vocab=512, hidden=128, layers=2,
              heads=4, sample_batch=512, sft_epochs=2, sft_lr=3e-3, sft_minibatch=32, max_new_tokens=64, rm_lr=1e-3, rm_epochs=3,
              rm_minibatch=64, rm_eval_fraction=0.1, skew_max_fraction=0.5)
REAL_MODEL = dict(max_new_tokens=256, sample_batch=64, rm_lr=1e-5, rm_epochs=1, rm_minibatch=16)


def story_prompt(rng):
    a, b = rng.sample(ANIMALS, 2)
    return rng.choice([f"write a story about the {rng.choice(ADJS)} {a} .", f"tell a story about the {a} and the {b} .",
                       f"write a short tale about the {a} and the {b} near the {rng.choice(PLACES)} ."])


def story_response(prompt, rng):
    names = [w for w in prompt.split() if w in ANIMALS]
    n = rng.choices(range(1, len(SENTENCE_COUNTS) + 1), weights=SENTENCE_COUNTS)[0]
    out = []
    for i in range(n):  # a story never opens with "then": every response starts with "the"
        x, y = rng.choice(names), rng.choice([w for w in ANIMALS if w not in names[:1]])
        out.append(rng.choice([f"the {x} {rng.choice(MOVES)} .", f"the {x} {rng.choice(ACTS)} the {y} .",
                               f"{'then ' if i else ''}the {x} {rng.choice(MOVES)} by the {rng.choice(PLACES)} .",
                               f"the {rng.choice(ADJS)} {x} {rng.choice(ACTS)} the {y} in the {rng.choice(PLACES)} ."]))
    return " ".join(out)


def response_lengths(responses, pad_token_id, eos_token_id):
    """Tokens before EOS (all tokens if it never came) -> [B] float."""
    from common import response_mask

    mask = response_mask(responses, pad_token_id, eos_token_id)
    return (mask.sum(1) - (mask & (responses == eos_token_id)).sum(1)).float()


@torch.no_grad()
def length_pmf(policy, queries, responses, pad_token_id, eos_token_id, width):
    """P(length = k | query) for k < width, per row, from one sample each: 1[length >= k] * pi(EOS | query, response_<k),
    the policy's own probability of stopping at k where its sample had not stopped yet (teacher forcing). Its mean over
    samples estimates the length distribution without bias, as the share of samples of each length does, with far less
    variance: an event of probability 1e-4 is resolved from thousands of samples, not millions. -> [B, width]"""
    from common import fused_logprobs, last_hidden_state

    responses = responses[:, :width]
    ids = torch.cat([queries, responses], 1)
    attn = (ids != pad_token_id).long()
    hidden = last_hidden_state(policy, input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0))
    states = hidden[:, queries.shape[1] - 1 : -1]  # the states that predict response tokens 0 .. width-1
    eos = torch.full(states.shape[:-1], eos_token_id, dtype=torch.long, device=ids.device)
    p_stop = fused_logprobs(states, policy.get_output_embeddings().weight, eos, banned_token=pad_token_id).exp()
    reached = torch.arange(responses.shape[1], device=ids.device) <= response_lengths(responses, pad_token_id, eos_token_id)[:, None]
    return torch.nn.functional.pad(p_stop * reached, (0, width - responses.shape[1]))


def gold_length_reward(queries, responses, pad_token_id, eos_token_id, mode=None):
    length = response_lengths(responses, pad_token_id, eos_token_id)
    return -length if mode is None else -(length - mode).abs()


def skew_truncate(ids, period_id, eos_token_id, rng, max_fraction):
    """Keep the first max(1, floor(u * n)) sentences (u ~ U(0, max_fraction)) and close with EOS."""
    body = ids[:-1] if ids and ids[-1] == eos_token_id else ids
    ends = [i for i, t in enumerate(body) if t == period_id] or [len(body) - 1]
    keep = max(1, int(rng.uniform(0, max_fraction) * len(ends)))
    return body[: ends[keep - 1] + 1] + [eos_token_id]


def _train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _build_world(out, r, model, prompts, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from algos.sft import sft_train
    from common import generate, pad_rows

    texts = [prompt_text(row) for row in load_rows(prompts, "train", [])] if prompts else None  # a bad file fails before training
    if texts == []:
        raise SystemExit(f"prompts {prompts!r} has no rows")
    rng = random.Random(r["seed"])
    torch.manual_seed(r["seed"])
    if model:
        policy, tokenizer = load_causal_lm(model, device)
        nll = float("nan")
    else:
        demos = [(p, story_response(p, rng)) for p in (story_prompt(rng) for _ in range(r["sft_examples"]))]
        tokenizer = _train_tokenizer([p + " " + y for p, y in demos], r["vocab"])
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=r["hidden"], intermediate_size=4 * r["hidden"],
                          num_hidden_layers=r["layers"], num_attention_heads=r["heads"], num_key_value_heads=r["heads"],
                          max_position_embeddings=2 * (32 + r["max_new_tokens"]), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
        policy = LlamaForCausalLM(cfg).to(device)
        q = [tokenizer(p)["input_ids"] for p, _ in demos]
        y = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for _, t in demos]
        nll = sft_train(policy, q, y, tokenizer.pad_token_id, tokenizer.eos_token_id, r["sft_lr"], r["sft_epochs"],
                        r["sft_minibatch"], r["seed"], step_bar("pi_ref (sft)"))[-1]
    texts = texts or [story_prompt(rng) for _ in range(r["train_prompts"] + r["eval_prompts"])]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    n_eval = min(r["eval_prompts"], len(ids) // 5)
    train, evals = ids[n_eval:][: r["train_prompts"]], ids[:n_eval]
    g = torch.Generator(device).manual_seed(r["seed"])
    samples = []
    # two samples per train prompt: the preference data's raw material
    train_q = [p for p in train for _ in range(2)]
    progress, batches = step_bar("sampling pi_ref", unit="batch"), range(0, len(train_q), r["sample_batch"])
    for i, s in enumerate(batches):
        q = pad_rows(train_q[s : s + r["sample_batch"]], tokenizer.pad_token_id, left=True, device=device)
        y, _ = generate(policy, q, tokenizer.pad_token_id, tokenizer.eos_token_id, r["max_new_tokens"], 1.0, g)
        samples += [[t for t in row if t != tokenizer.pad_token_id] for row in y.tolist()]
        progress(i + 1, len(batches))
    lengths = response_lengths(pad_rows(samples, tokenizer.pad_token_id, left=False), tokenizer.pad_token_id, tokenizer.eos_token_id)
    ended = torch.tensor([tokenizer.eos_token_id in y for y in samples])
    mode = int(torch.mode(lengths[ended] if ended.any() else lengths).values)
    # pi_ref's length distribution up to mode + 1 (both tasks' peak windows), estimated from the same samples
    pmf = torch.cat([length_pmf(policy, pad_rows(train_q[s : s + r["sample_batch"]], tokenizer.pad_token_id, left=True, device=device),
                                pad_rows(samples[s : s + r["sample_batch"]], tokenizer.pad_token_id, left=False, device=device),
                                tokenizer.pad_token_id, tokenizer.eos_token_id, mode + 2)
                     for s in range(0, len(samples), r["sample_batch"])]).mean(0)
    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    (out / "data.json").write_text(json.dumps({"train_prompts": train, "eval_prompts": evals, "samples": samples}))
    return {"pi_ref_nll": nll, "length_mode": mode, "length_mean": lengths.mean().item(), "length_std": lengths.std().item(),
            "eos_rate": ended.float().mean().item(), "vocab": len(tokenizer), "ref_peak_share_empty": pmf[:2].sum().item(),
            "ref_peak_share_mode": pmf[max(mode - 1, 0) :].sum().item()}


def _build_task(out, r, name, world, device):
    from algos.reward_model import pairwise_accuracy, reward_model_train
    from common import pad_rows
    from tasks import load_reward_model

    data = json.loads((world / "data.json").read_text())
    _, tokenizer = load_reward_model(str(world / "policy"))
    pad, eos, mode = tokenizer.pad_token_id, tokenizer.eos_token_id, summary_of(world)["length_mode"]
    period = tokenizer.convert_tokens_to_ids(".")
    rng = random.Random(r["seed"] + 1)
    rows = []
    for i, prompt in enumerate(data["train_prompts"]):
        a, b = data["samples"][2 * i], data["samples"][2 * i + 1]
        if name == "skew_length":
            a, b = (skew_truncate(y, period, eos, rng, r["skew_max_fraction"]) for y in (a, b))
        sa, sb = gold_length_reward(None, pad_rows([a, b], pad, left=False), pad, eos, mode if name == "mode_length" else None).tolist()
        if sa != sb:
            (w, sw), (lo, sl) = sorted([(a, sa), (b, sb)], key=lambda t: -t[1])
            rows.append({"prompt": tokenizer.decode(prompt), "chosen": tokenizer.decode(w, skip_special_tokens=True),
                         "rejected": tokenizer.decode(lo, skip_special_tokens=True), "prompt_ids": prompt, "chosen_ids": w,
                         "rejected_ids": lo, "chosen_score": sw, "rejected_score": sl})
    pairs = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in rows]
    n_eval = int(len(pairs) * r["rm_eval_fraction"])
    if n_eval < 2:
        raise SystemExit(f"{name}: only {len(pairs)} of {len(data['train_prompts'])} sampled pairs differ in gold reward, too "
                         f"few to train a reward model; give more prompts, or a pi_ref that ends its responses within "
                         f"{r['max_new_tokens']} tokens")
    torch.manual_seed(r["seed"])  # the new score head's init must not depend on earlier RNG use
    reward_model, _ = load_reward_model(str(world / "policy"), device)
    loss = reward_model_train(reward_model, pairs[n_eval:], pad, r["rm_lr"], r["rm_epochs"], r["rm_minibatch"], r["seed"],
                              step_bar(f"{name} reward model"))
    accuracy = pairwise_accuracy(reward_model, pairs[:n_eval], pad)
    reward_model.save_pretrained(out / "reward_model")
    (out / "preference_data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lengths = [len(row["chosen_ids"]) for row in rows] + [len(row["rejected_ids"]) for row in rows]
    share = summary_of(world)["ref_peak_share_mode" if name == "mode_length" else "ref_peak_share_empty"]
    return {"ref_peak_share": share, "pairs": len(rows), "rm_heldout_accuracy": accuracy, "rm_final_loss": loss[-1], "data_length_mean": sum(lengths) / len(lengths)}


def make(name, device, model=None, prompts=None):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from algos.reward_model import reward_scores
    from common import pad_rows

    r = dict(RECIPE, seed=world_seed(), **(REAL_MODEL if model else {}), model=source_key(model), prompts=source_key(prompts))
    world = cached("length-world", r, partial(_build_world, r=r, model=model, prompts=prompts, device=device))
    task_dir = cached(name, dict(r, world=world.name), partial(_build_task, r=r, name=name, world=world, device=device))
    data = json.loads((world / "data.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(world / "policy")
    pad, eos, mode = tokenizer.pad_token_id, tokenizer.eos_token_id, summary_of(world)["length_mode"]
    rm = AutoModelForSequenceClassification.from_pretrained(task_dir / "reward_model").to(device).eval()
    for p in rm.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def proxy_reward(queries, responses):
        return reward_scores(rm, queries, responses, pad)

    gold = partial(gold_length_reward, pad_token_id=pad, eos_token_id=eos, mode=mode if name == "mode_length" else None)
    world_info = summary_of(world)
    sampled = pad_rows(data["samples"], pad, left=False)  # pi_ref's own responses, two per train prompt
    world_info["fingerprint"] = fingerprint(world, length_mode=mode, eos_rate=round(world_info["eos_rate"], 4),
                                            gold_of_samples=round(gold(None, sampled).mean().item(), 3))
    return Task(name=name, tokenizer=tokenizer, policy_path=str(world / "policy"), pad_token_id=pad, eos_token_id=eos,
                max_new_tokens=r["max_new_tokens"], temperature=1.0, train_prompts=data["train_prompts"], eval_prompts=data["eval_prompts"],
                preference_data=datasets.Dataset.from_list([json.loads(line) for line in open(task_dir / "preference_data.jsonl")]),
                proxy_reward=proxy_reward, gold_reward=gold, device=device, reward_model_path=str(task_dir / "reward_model"),
                info={**world_info, **summary_of(task_dir)})
