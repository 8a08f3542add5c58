"""Didactic bandit (docs/paper.md 3a): token sequences whose reward peaks where pi_ref is unlikely (R1) or likely (R2).

- Vocabulary: tokens 0..99 (written as the words "0".."99") plus a pad token (100). No EOS: every
  response is exactly 9 tokens. Prompt: one token drawn uniformly.
- pi_data: the 100-bin histogram of tanh(Cauchy(loc=-0.7, scale=0.4)) on [-1, 1] (10,000 samples,
  seed 0). Interior mode near token 16-20, spikes at 0 and 99, p(70) ~ 0.002.
- pi_ref: a tiny GPT-style (Llama) transformer, 3 layers x 48 wide, trained by `algos/sft.py`'s
  `sft_train` on sequences whose 9 response tokens are i.i.d. from pi_data, so that every position's
  next-token distribution matches pi_data.
- Reward R_mu(y) = mean over the 9 response tokens of exp(-((y_i - mu) / 10)^2); R1: mu = 70, R2:
  mu = 20. Unlike the original code, the prompt token is not averaged in and token t is scored as
  itself (no off-by-one). Proxy reward = gold reward, as in the study.
- Offline preference data: N = 10 samples per train prompt from pi_ref, all 45 pairs ordered by
  reward, ties dropped. 10 train prompts, 100 eval prompts (the original scale).
- Geometry (recorded at build as `ref_peak_share`, in each task's info): pi_ref's mean probability per response token of
  a token within 5 of mu, from its exact next-token distributions along 10 of its own samples per eval prompt (teacher
  forcing; 9,000 positions). Measured: bandit_r1 0.0257, bandit_r2 0.260 (pi_data's own: 0.0252, 0.262): the R1 peak
  is 10x rarer.
"""

import json
from functools import partial

import numpy as np
import torch

from tasks import Task, cached, fingerprint, step_bar, summary_of, world_seed

VOCAB, PAD, RESPONSE_LEN = 100, 100, 9
MU = {"bandit_r1": 70.0, "bandit_r2": 20.0}
RECIPE = dict(version=2, seed=0, hist_samples=10_000, loc=-0.7, scale=0.4, hidden=48, layers=3, heads=3,
              sft_sequences=16_384, sft_epochs=3, sft_lr=3e-3, sft_minibatch=256, train_prompts=10, eval_prompts=100,
              samples_per_prompt=10)


def pi_data(seed=RECIPE["seed"], n=RECIPE["hist_samples"]) -> np.ndarray:
    """[100] probabilities: histogram of tanh(Cauchy(-0.7, 0.4)) over 100 equal bins of [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = np.tanh(RECIPE["loc"] + RECIPE["scale"] * rng.standard_cauchy(n))
    counts, _ = np.histogram(x, bins=VOCAB, range=(-1.0, 1.0))
    return counts / counts.sum()


def bandit_reward(queries, responses, mu):
    """R_mu: mean over the response tokens (never the prompt) of exp(-((y - mu) / 10)^2) -> [B]."""
    mask = responses != PAD
    score = torch.exp(-(((responses.float() - mu) / 10.0) ** 2)) * mask
    return score.sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def peak_share(model, queries, responses, mu):
    """pi_ref's mean probability, per response token, of a token within 5 of mu (R_mu's width is 10): its exact next-token
    distribution at each of the 9 positions along its own samples (teacher forcing), summed over the band, averaged."""
    logits = model(torch.cat([queries, responses[:, :-1]], 1)).logits[:, -RESPONSE_LEN:, :VOCAB]  # pad excluded, as sampled
    band = (torch.arange(VOCAB) - mu).abs() <= 5
    return logits.softmax(-1)[..., band].sum(-1).mean().item()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(VOCAB)} | {"<pad>": PAD}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _build(out, r=RECIPE):
    from transformers import LlamaConfig, LlamaForCausalLM

    from algos.sft import sft_train
    from common import generate, pad_rows

    torch.manual_seed(r["seed"])
    g = torch.Generator().manual_seed(r["seed"])
    p = torch.tensor(pi_data())
    prompts = torch.randint(0, VOCAB, (r["sft_sequences"], 1), generator=g)
    demos = torch.multinomial(p, r["sft_sequences"] * RESPONSE_LEN, replacement=True, generator=g).view(-1, RESPONSE_LEN)
    cfg = LlamaConfig(vocab_size=VOCAB + 1, hidden_size=r["hidden"], intermediate_size=4 * r["hidden"], num_hidden_layers=r["layers"],
                      num_attention_heads=r["heads"], num_key_value_heads=r["heads"], max_position_embeddings=16,
                      pad_token_id=PAD, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    nll = sft_train(model, prompts.tolist(), demos.tolist(), PAD, None, r["sft_lr"], r["sft_epochs"], r["sft_minibatch"], r["seed"],
                    step_bar("bandit pi_ref (sft)"))
    train = torch.randint(0, VOCAB, (r["train_prompts"], 1), generator=g).tolist()
    evals = torch.randint(0, VOCAB, (r["eval_prompts"], 1), generator=g).tolist()
    queries = pad_rows([q for q in train for _ in range(r["samples_per_prompt"])], PAD, left=True)
    samples, _ = generate(model, queries, PAD, None, RESPONSE_LEN, 1.0, g)
    eval_queries = torch.tensor([q for q in evals for _ in range(r["samples_per_prompt"])])
    eval_samples, _ = generate(model, eval_queries, PAD, None, RESPONSE_LEN, 1.0, g)
    shares = {f"ref_peak_share_{name}": peak_share(model, eval_queries, eval_samples, mu) for name, mu in MU.items()}
    model.save_pretrained(out / "policy")
    _tokenizer().save_pretrained(out / "policy")
    (out / "data.json").write_text(json.dumps({"train_prompts": train, "eval_prompts": evals, "samples": samples.tolist()}))
    return {"pi_ref_final_nll": nll[-1], "pi_data_entropy": float(-(p[p > 0] * p[p > 0].log()).sum()), **shares}


def preference_pairs(train_prompts, samples, mu, per_prompt):
    """All pairs among each prompt's samples, ordered by R_mu, ties dropped -> list of dict rows."""
    rows = []
    for i, prompt in enumerate(train_prompts):
        ys = samples[i * per_prompt : (i + 1) * per_prompt]
        scores = bandit_reward(None, torch.tensor(ys), mu).tolist()
        for a in range(per_prompt):
            for b in range(a + 1, per_prompt):
                if scores[a] == scores[b]:
                    continue
                w, lo = (a, b) if scores[a] > scores[b] else (b, a)
                rows.append({"prompt_ids": prompt, "chosen_ids": ys[w], "rejected_ids": ys[lo],
                             "chosen_score": scores[w], "rejected_score": scores[lo]})
    return rows


def make(name, device, model=None, prompts=None):
    import datasets
    from transformers import AutoTokenizer

    if model or prompts:
        raise SystemExit(f"{name} builds its own policy and prompts; --model and --prompts apply to the length tasks")
    r = dict(RECIPE, seed=world_seed())  # pi_data, the task itself, stays; the world's pi_ref, prompts and samples change
    d = cached("bandit", r, partial(_build, r=r))
    data = json.loads((d / "data.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(d / "policy")
    rows = preference_pairs(data["train_prompts"], data["samples"], MU[name], RECIPE["samples_per_prompt"])
    for row in rows:
        for k in ("prompt", "chosen", "rejected"):
            row[k] = tokenizer.decode(row[f"{k}_ids"])
    reward = partial(bandit_reward, mu=MU[name])
    return Task(name=name, tokenizer=tokenizer, policy_path=str(d / "policy"), pad_token_id=PAD, eos_token_id=None,
                max_new_tokens=RESPONSE_LEN, temperature=1.0, train_prompts=data["train_prompts"], eval_prompts=data["eval_prompts"],
                preference_data=datasets.Dataset.from_list(rows), proxy_reward=reward, gold_reward=reward, device=device,
                info={"mu": MU[name], "pairs": len(rows), "ref_peak_share": summary_of(d)[f"ref_peak_share_{name}"],
                      "fingerprint": fingerprint(d, gold_of_samples=round(reward(None, torch.tensor(data["samples"])).mean().item(), 3))})
