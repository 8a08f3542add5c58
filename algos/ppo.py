"""PPO: a token-level clipped policy gradient with a learned value model, GAE and an adaptive KL penalty.

    loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   rho_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
    r_t = -kl_coef * (log pi_old - log pi_ref)(y_t) (+ the proxy reward at the last token),   A = whiten(GAE(r, V; gamma, lambda))

Schulman et al. 2017, for language models as in Ziegler et al. 2019 and Stiennon et al. 2020, written after
summarize_from_feedback_details (Huang et al. 2024); the study's PPO (Tajwar et al. 2024, docs/paper.md section 4).
Each iteration samples C completions for each of B / C prompts from pi_theta (pi_old: the sampling pass's
log-probs), scores them with the proxy reward and spreads credit over tokens: a per-token KL penalty, the score
at the last token, GAE (gamma 1, lambda 0.95) against a value model V, advantages whitened over the batch.
T passes of M-sized minibatches then minimise the clipped surrogate plus the clipped value loss. Axes: on-policy
sampling YES, sample reuse with T > 1 (what the clip is for; claim 6), negative gradient YES (A_t < 0).
C = 4 by default, as every on-policy script here: every on-policy arm of a claim samples alike.

Log-probs are per token (EOS included, pads never), scored at the sampling temperature; losses are token
means over the minibatch. V is a separate sequence classifier with one output, initialised from the task's
proxy reward model where it has one (length tasks), else from pi_ref with a new scalar head (bandits, whose
proxy is the true reward); V(x, y_<t) is its score head on the hidden state before token t. V has its own Adam
at the same learning rate, so there is no value-loss coefficient (Adam would undo one). Adaptive KL controller
(Ziegler et al. 2019): after each batch kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * B / horizon, with KL
the batch's mean sequence KL, target 6 and horizon 10000 (lm-human-preferences); at 100 x 64 samples it moves
kl_coef by at most 14%. A completion without EOS loses `--missing-eos-penalty` from its score.

The penalty decides what PPO can reach: on bandit_r1 the KL-regularised optimum pi* ~ pi_ref exp(r / kl_coef)
at kl_coef 0.02 has E[r] = 0.76 at KL 21.7 (bandit_r2: 0.89 at 9.4), so the tuned bandit defaults start from a weaker
penalty (0.0063, TASK_DEFAULTS); REINFORCE, with no penalty, can reach 1.0. Departures from
summarize_from_feedback_details: values are masked with the response mask (it keeps one position more), the
approx_kl logged is the k3 estimate (CleanRL's), two optimisers instead of one over both models with vf_coef.

    python algos/ppo.py --task min_length
    python algos/ppo.py --task bandit_r1 --update-epochs 4
"""

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import disable_dropout, exact_div, generate, last_hidden_state, pad_rows, response_logprobs  # noqa: E402
from common import all_reduce_mean, open_metrics, resume, save_checkpoint, shard, start_run, user_errors, wrap  # noqa: E402
from tasks import TaskName, make_task  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = False
    """run on CUDA (falls back to CPU with a warning when there is none)"""
    fsdp: bool = False
    """under torchrun: shard the policy and pi_ref with FSDP2 (fully_shard) instead of DDP (docs/scaling.md)"""
    bf16: bool = False
    """forward passes under bf16 autocast (fp32 weights and Adam state); for CUDA"""
    resume: Optional[str] = None
    """continue the run runs/<run> from its latest checkpoint (saved by --save-model); its args.json gives every other argument
    (a flag given as well must agree with it, but --num-iterations may grow and --threads and --track may change)"""
    compile: bool = False
    """sample with a static KV cache and a compiled decode step (torch.compile; CUDA graphs on a GPU; compiles on first use)"""
    threads: int = 1
    """torch CPU threads (2 threads on a busy 2-core machine are far slower than 1)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "cleanpref"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    task: TaskName = "skew_length"
    """the task (tasks/): its reference policy, prompts, preference data and rewards"""
    model: Optional[str] = None
    """replace the task's reference policy with this Hugging Face causal LM (local path or hub id)"""
    prompts: Optional[str] = None
    """replace the task's prompts with this dataset (`prompt`, or AlpacaFarm's `instruction` and `input`):
    a .json/.jsonl file, a `save_to_disk` directory, or a hub `id[:config][@split]`"""
    dataset: Optional[str] = None
    """replace the task's preference pairs (offline scripts) and train prompts (on-policy scripts) with this dataset: `prompt`,
    `chosen`, `rejected` as text or chat messages (UltraFeedback binarized), or AlpacaFarm's pairs (tasks/preferences.py)"""
    reward_model: Optional[str] = None
    """replace the task's proxy reward with this Hugging Face sequence classifier (one output; local path or hub id)"""
    gold_reward_model: Optional[str] = None
    """replace the task's gold reward (eval/gold_reward) with this Hugging Face sequence classifier"""
    max_prompt_length: Optional[int] = None
    """--dataset rows: a longer prompt keeps its last this many tokens"""
    max_length: Optional[int] = None
    """--dataset rows: prompt + response tokens at most (a longer response is cut and loses its EOS)"""
    save_model: bool = False
    """save the policy to runs/{run_name}/model at every evaluation (the last one is the final policy)"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations (and at 0 and the end)"""
    eval_dense_every: int = 2
    """up to iteration --eval-dense-until, evaluate every this many iterations instead (where learning curves move)"""
    eval_dense_until: int = 0
    """the end of that denser start (0: none; the study passes 30)"""
    num_eval_prompts: int = 128
    """held-out prompts per evaluation"""

    # Algorithm 1 (docs/paper.md section 2)
    num_iterations: Optional[int] = None
    """I, iterations (collections of B samples); default per task, see TASK_DEFAULTS at the top of --help"""
    batch_size: int = 64
    """B, samples (completions) per iteration"""
    num_completions: int = 4
    """C, completions sampled per prompt (B / C prompts per iteration)"""
    minibatch_size: int = 16
    """M, samples per gradient step"""
    update_epochs: int = 1
    """T, passes over each batch (sample reuse)"""
    learning_rate: Optional[float] = None
    """Adam learning rate; default per task, see TASK_DEFAULTS at the top of --help"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # Algorithm specific arguments
    init_kl_coef: Optional[float] = None
    """initial weight of the per-token KL(pi || pi_ref) penalty in the reward (docs/paper.md: 0.2 or 0.02); default per
    task, see TASK_DEFAULTS, else 0.02"""
    adaptive_kl: bool = True
    """adapt kl_coef towards target_kl (Ziegler et al. 2019); off: kl_coef stays init_kl_coef"""
    target_kl: float = 6.0
    """the controller's target for the batch's mean sequence KL(pi || pi_ref), in nats"""
    kl_horizon: int = 10000
    """the controller's horizon in samples: the larger, the slower kl_coef moves"""
    gamma: float = 1.0
    """GAE discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """eps: the ratio is clipped to [1 - eps, 1 + eps], the new value to the old one +- eps"""
    missing_eos_penalty: float = 10.0
    """subtracted from the proxy reward of completions that never emit EOS (the reward model never saw
    one, so its score there is arbitrary and a policy could exploit it by never stopping); 0 turns it off"""

    # to be filled in runtime (not flags; recorded in args.json)
    num_minibatches: tyro.conf.Suppress[int] = 0
    """B / M"""
    world_size: tyro.conf.Suppress[int] = 1
    """processes (torchrun); B and M are global: each process trains on its share of every minibatch"""
    num_prompts: tyro.conf.Suppress[int] = 0
    """B / C, prompts per iteration"""


# tuned on each embedded task by `python benchmarks/study.py --tune` (docs/study.md; scores in benchmarks/tuning.json);
# a value given on the command line wins
TASK_DEFAULTS = {
    "bandit_r1": dict(num_iterations=100, learning_rate=1e-2, init_kl_coef=0.0063),
    "bandit_r2": dict(num_iterations=100, learning_rate=3e-2, init_kl_coef=0.0063),
    "min_length": dict(num_iterations=60, learning_rate=1e-3, init_kl_coef=0.02),  # tuned 3e-3; issue 30: it collapsed on world 1 (seed 1, iteration 8)
    "mode_length": dict(num_iterations=60, learning_rate=1e-3, init_kl_coef=0.063),
    "skew_length": dict(num_iterations=60, learning_rate=1e-3, init_kl_coef=0.063),
}

# how benchmarks/study.py and the tests run this script (docs/fork.md): a fork edits these three lines, nothing elsewhere
STUDY = dict(
    responses_per_row=lambda args: 1,  # what `samples` counts per row of B: each of the B completions
    variants=[],  # switches that make a method of their own, tuned and reported on their own
    knob=("init_kl_coef", 0.02),  # a strength the tuning sweeps beside the rate: (Args field, its untuned value), or None
)


def masked_mean(x, mask):
    """Mean of x over the True entries of mask (same shape); 0 when there are none."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over response tokens -> (advantages, returns), [B, L] each, 0 where masked.

    rewards, values: [B, L]; mask: [B, L] bool, a prefix of each row (True up to the response's last token).
    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last token; A_t = delta_t + gamma * lam * A_{t+1}.
    """
    rewards, values = rewards * mask, values * mask  # pads: no reward, no value, so no delta
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def ppo_losses(new_logps, old_logps, advantages, new_values, old_values, returns, mask, clip):
    """PPO's clipped policy and value losses, token means over the mask; every input [B, L].

    Returns (pg_loss, vf_loss, clipfrac: share of tokens whose clipped term is the larger loss, i.e. whose gradient
    the clip cut, approx_kl: the k3 estimate of KL(pi_old || pi), mean over tokens); the last two detached.
    """
    ratio = torch.exp(new_logps - old_logps)
    pg_losses, pg_losses_clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    values_clipped = old_values + (new_values - old_values).clamp(-clip, clip)
    vf_loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    clipfrac = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
    approx_kl = masked_mean((ratio - 1) - (new_logps - old_logps), mask)
    return pg_loss, vf_loss, clipfrac.detach(), approx_kl.detach()


def masked_whiten(x, mask):
    """(x - mean) / std over the True entries of mask, 0 elsewhere."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask) + 1e-8) * mask


def load_value_model(task, device):
    """V: the task's proxy reward model (a sequence classifier with one output) if it has one, else pi_ref with a
    new scalar head; fp32, dropout off."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # pi_ref has no score head: that it is new is expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(task.reward_model_path or task.policy_path, num_labels=1,
                                                                   dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return disable_dropout(model).to(device).eval()


def token_values(value_model, queries, responses, pad_token_id):
    """V(x, y_<t) at every response position -> [B, Lr] fp32: the score head on the backbone's hidden states,
    with the attention mask and position ids of common.response_logprobs (left-padded queries)."""
    ids = torch.cat([queries, responses], dim=1)
    attn = (ids != pad_token_id).long()
    hidden = last_hidden_state(value_model, input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0))
    return value_model.score(hidden[:, queries.shape[1] - 1 : -1]).squeeze(-1).float()  # the state before each response token


@torch.no_grad()
def evaluate(policy, ref_policy, task, prompts, seed, compile=False):
    """Sample one response per held-out prompt; gold/proxy reward, length, EOS rate, MC KL(pi || pi_ref)."""
    queries = pad_rows(prompts, task.pad_token_id, left=True, device=task.device)
    generator = torch.Generator(task.device).manual_seed(seed)  # the same draws at every evaluation
    responses, logps = generate(policy, queries, task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, generator,
                                compile)
    ref_logps, mask = response_logprobs(ref_policy, queries, responses, task.pad_token_id, task.eos_token_id, task.temperature)
    ended = (responses == task.eos_token_id).any(1) if task.eos_token_id is not None else torch.ones_like(mask[:, 0])
    gold, proxy = task.gold_reward(queries, responses), task.proxy_reward(queries, responses)
    metrics = {"eval/gold_reward": gold.mean().item(), "eval/proxy_reward": proxy.mean().item(),
               "eval/response_length": (mask.sum(1) - ended.long() * (task.eos_token_id is not None)).float().mean().item(),
               "eval/eos_rate": ended.float().mean().item(), "eval/kl_ref": (logps - ref_logps).sum(1).mean().item()}
    table = [(task.decode(q), task.decode(r), g, p) for q, r, g, p in zip(prompts[:3], responses[:3].tolist(), gold.tolist(), proxy.tolist())]
    return metrics, table


def main(args: Args):
    run_name, run_dir = start_run(args, f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")  # --resume, torchrun, checks
    for k, v in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_iterations is None or args.learning_rate is None:  # the real tasks have no tuned defaults
        raise SystemExit(f"--task {args.task} has no tuned defaults: pass --num-iterations and --learning-rate")
    args.init_kl_coef = 0.02 if args.init_kl_coef is None else args.init_kl_coef
    args.num_minibatches = exact_div(args.batch_size, args.minibatch_size, "--batch-size / --minibatch-size")
    args.num_prompts = exact_div(args.batch_size, args.num_completions, "--batch-size / --num-completions")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise SystemExit(f"--gamma and --lam must lie in [0, 1], got {args.gamma} and {args.lam}")
    if not (args.cliprange > 0 and args.kl_horizon > 0 and args.target_kl > 0):
        raise SystemExit(f"--cliprange, --kl-horizon and --target-kl must be > 0, got {args.cliprange}, {args.kl_horizon}, {args.target_kl}")
    if not args.missing_eos_penalty >= 0:
        raise SystemExit(f"--missing-eos-penalty must be >= 0 (0 turns it off), got {args.missing_eos_penalty}")
    if not args.init_kl_coef >= 0:
        raise SystemExit(f"--init-kl-coef must be >= 0, got {args.init_kl_coef}")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.threads)
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no CUDA device is available; running on CPU")
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    task = make_task(args.task, device, args.model, args.prompts, args.dataset, args.reward_model, args.gold_reward_model,
                     args.max_prompt_length, args.max_length)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name, save_code=True)
    print(f"run {run_name}: {json.dumps(asdict(args))}")
    policy = task.load_policy()
    ref_policy = task.load_policy().requires_grad_(False)  # frozen pi_ref
    policy, ref_policy = wrap(policy, args), wrap(ref_policy, args)  # under torchrun: DDP (or FSDP2); --bf16: autocast
    value_model = wrap(load_value_model(task, device), args)  # the critic: trained alongside, by its own optimiser
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    value_optimizer = torch.optim.Adam(value_model.parameters(), lr=args.learning_rate)
    eval_prompts = task.eval_prompts[: args.num_eval_prompts]
    metrics_file = open_metrics(run_dir, args)  # rank 0 writes; --resume appends
    start, samples_seen = time.time(), 0

    def log(iteration, metrics):
        """Write one row of metrics; at iteration 0, on the eval schedule and the last, evaluate (and checkpoint) first."""
        table, metrics = None, all_reduce_mean(metrics)  # training statistics: the mean over ranks
        every = args.eval_dense_every if iteration <= args.eval_dense_until else args.eval_every
        if iteration % every == 0 or iteration == args.num_iterations:
            eval_metrics, table = evaluate(policy, ref_policy, task, eval_prompts, args.seed, args.compile)
            metrics = {**metrics, **eval_metrics}
        row = {"iteration": iteration, "samples": samples_seen, "time_s": round(time.time() - start, 3), **metrics}
        if args.save_model and table is not None and iteration > 0:  # a killed run keeps its latest evaluated policy; --resume goes on
            save_checkpoint(run_dir, policy, optimizer, task.tokenizer, row, resumable())
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(row, step=samples_seen)
        if table:
            print(f"iter {iteration:4d} samples {samples_seen:6d} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("eval/")))
            for prompt, response, gold, proxy in table:
                print(f"    gold {gold:7.3f} proxy {proxy:7.3f} | {prompt} -> {response[:100]}")

    # ALGO LOGIC: the train prompts; completions come from the current policy
    data = task.train_prompts
    sampler, prompt_sampler = torch.Generator(device).manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    kl_coef = args.init_kl_coef

    def resumable():  # the run's state beyond the policy, its optimizer and the RNGs: what --resume restores (common.py)
        return dict(samples_seen=samples_seen, elapsed=time.time() - start, sampler=sampler, prompt_sampler=prompt_sampler, kl_coef=kl_coef, value=(value_model, value_optimizer))

    first, (samples_seen, elapsed, sampler, prompt_sampler, kl_coef, _) = resume(args, run_dir, policy, optimizer, resumable())
    start = time.time() - elapsed
    if first == 1:
        log(0, {})
    for iteration in range(first, args.num_iterations + 1):
        # ALGO LOGIC: draw B / C prompts, sample C completions each from pi_theta, score them, per-token rewards and GAE
        batch = torch.randint(len(data), (args.num_prompts,), generator=prompt_sampler)  # uniform, with replacement
        prompts = pad_rows([data[i] for i in batch.tolist()], task.pad_token_id, left=True, device=device)
        queries = prompts.repeat_interleave(args.num_completions, dim=0)
        with torch.no_grad():
            responses, logps = generate(policy, queries, task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, sampler,
                                        args.compile)
            scores = task.proxy_reward(queries, responses)
            if task.eos_token_id is not None:
                scores -= args.missing_eos_penalty * (responses != task.eos_token_id).all(1)
            ref_logps, mask = response_logprobs(ref_policy, queries, responses, task.pad_token_id, task.eos_token_id, task.temperature)
            values = token_values(value_model, queries, responses, task.pad_token_id) * mask  # V(x, y_<t), [B, L]
            kl = logps - ref_logps  # per-token log pi_old - log pi_ref, 0 on pads, [B, L]
            rewards = -kl_coef * kl
            last = (mask.sum(1) - 1).clamp(min=0)  # each response's last token: its EOS, or where it was cut off
            rewards[torch.arange(args.batch_size, device=device), last] += scores
            advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, mask)
        samples_seen += args.batch_size
        metrics = {"train/kl_coef": kl_coef, "objective/kl": kl.sum(1).mean().item(), "objective/proxy_reward": scores.mean().item(),
                   "train/value_mean": masked_mean(values, mask).item(), "train/return_mean": masked_mean(returns, mask).item()}
        if args.adaptive_kl:  # Ziegler et al. 2019: proportional control of the batch's mean KL towards the target
            kl_coef *= 1 + float(np.clip(kl.sum(1).mean().item() / args.target_kl - 1, -0.2, 0.2)) * args.batch_size / args.kl_horizon

        # ALGO LOGIC: T passes of minibatch gradient steps over the batch (policy and value model)
        stats = []
        for epoch in range(args.update_epochs):
            perm = torch.randperm(args.batch_size)
            for mb in perm.chunk(args.num_minibatches):
                mb, scale = shard(mb, mask.sum(1))  # this rank's share of the global minibatch (common.py)
                new_logps, _ = response_logprobs(policy, queries[mb], responses[mb], task.pad_token_id, task.eos_token_id, task.temperature)
                new_values = token_values(value_model, queries[mb], responses[mb], task.pad_token_id)
                pg_loss, vf_loss, clipfrac, approx_kl = ppo_losses(new_logps, logps[mb], advantages[mb], new_values, values[mb], returns[mb],
                                                                   mask[mb], args.cliprange)
                loss = pg_loss + vf_loss  # disjoint parameters: each optimiser sees only its own model's gradient
                loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global minibatch mean
                optimizer.zero_grad(set_to_none=True)
                value_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm)
                optimizer.step()
                value_optimizer.step()
                stats.append([loss.item(), pg_loss.item(), vf_loss.item(), new_logps.sum(1).mean().item(), grad_norm.item(),
                              clipfrac.item(), approx_kl.item()])
        s = np.mean(stats, axis=0)
        metrics.update(zip(["train/loss", "train/policy_loss", "train/value_loss", "logps/policy", "train/grad_norm",
                            "train/clipfrac", "train/approx_kl"], s.tolist()))
        log(iteration, metrics)

    metrics_file.close()
    if args.track:
        wandb.finish()
    print(f"done in {time.time() - start:.0f}s: runs/{run_name}")


if __name__ == "__main__":
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        defaults = "; ".join(f"{t}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in d.items()) for t, d in TASK_DEFAULTS.items())
        main(tyro.cli(Args, description=f"{__doc__.splitlines()[0]}\n\nPer-task defaults (TASK_DEFAULTS; a flag given wins): {defaults}"))
