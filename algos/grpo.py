"""GRPO: a clipped per-token policy gradient with group-normalised advantages on completions from pi_theta.

    loss = -mean_i 1/|y_i| sum_t [min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta * k3_t],   A_i = (r_i - mean) / (std + 1e-4)

Shao et al. 2024 (DeepSeekMath, eq. 3): a group of C completions for each of B / C prompts from pi_theta, proxy
rewards normalised within the group (unbiased std, as TRL), rho_t = pi_theta / pi_old per token (pi_old: the sampling
pass). Axes: on-policy sampling YES, sample reuse with T > 1 (the clip bounds it), negative gradient YES (A < 0).
C = 4 by default, as every on-policy script here (every on-policy arm of a claim samples alike); with C = 2 the group
normalisation reduces A to +-0.71, the sign of the reward difference.
`--loss-type dr_grpo` (Dr. GRPO, Liu et al. 2025): 1/|y_i| shrinks each token's push-down as a wrong (A < 0) answer
grows longer, and the std up-weights groups that barely differ; dr_grpo uses r - mean, token sum / (M * max_new_tokens).

Log-probs are sequence sums over response tokens (EOS included, pads never), scored at the sampling
temperature. k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 per token; `--beta` 0.04 is GRPO's with a
learned reward model, as here (TRL defaults to 0 for rule-based rewards). A tied group gets A = 0 exactly.

    python algos/grpo.py --task min_length
    python algos/grpo.py --task bandit_r1 --num-completions 8 --loss-type dr_grpo --update-epochs 2
"""

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import exact_div, generate, pad_rows, response_logprobs  # noqa: E402
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
    loss_type: Literal["grpo", "dr_grpo"] = "grpo"
    """grpo: A / std and a per-sequence token mean; dr_grpo (Dr. GRPO): neither"""
    beta: Optional[float] = None
    """weight of the per-token k3 estimate of KL(pi || pi_ref) in the loss; 0 turns it off; default per task, see
    TASK_DEFAULTS, else 0.04"""
    cliprange: float = 0.2
    """eps: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]"""
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
    "bandit_r1": dict(num_iterations=100, learning_rate=3e-2, beta=0.013),
    "bandit_r2": dict(num_iterations=100, learning_rate=1e-2, beta=0.013),
    "min_length": dict(num_iterations=60, learning_rate=1e-3, beta=0.013),  # tuned 3e-3; issue 30: on world 1 it swung -2 -> -19 -> -28
    "mode_length": dict(num_iterations=60, learning_rate=1e-3, beta=0.013),
    "skew_length": dict(num_iterations=60, learning_rate=1e-3, beta=0.04),
}

# how benchmarks/study.py and the tests run this script (docs/fork.md): a fork edits these three lines, nothing elsewhere
STUDY = dict(
    responses_per_row=lambda args: 1,  # what `samples` counts per row of B: each of the B completions
    variants=[],  # switches that make a method of their own, tuned and reported on their own
    knob=("beta", 0.04),  # a strength the tuning sweeps beside the rate: (Args field, its untuned value), or None
)


def grpo_loss(new_logps, old_logps, ref_logps, advantages, mask, clip, beta, loss_type, max_tokens=None):
    """GRPO loss from per-token log-probs [N, L] (mask [N, L], True on response tokens) and advantages [N].

    Returns (loss, clipfrac: share of tokens whose clipped term cut the gradient, mean k3). Normalisation: see below.
    """
    ratio = torch.exp(new_logps - old_logps)  # [N, L]
    unclipped, clipped = ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None]
    k3 = torch.exp(ref_logps - new_logps) - (ref_logps - new_logps) - 1  # >= 0, unbiased for KL under pi samples
    per_token = -(torch.min(unclipped, clipped) - beta * k3) * mask
    if loss_type == "grpo":  # each sequence's token mean, then the mean over sequences
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:  # the token sum over a constant: N * the generation budget (default: the mask's width)
        loss = per_token.sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    n_tokens = mask.sum().clamp(min=1)
    return loss, ((clipped < unclipped) & mask).sum() / n_tokens, (k3 * mask).sum().detach() / n_tokens


def group_advantages(rewards, loss_type):
    """[P, C] rewards -> [P, C]: (r - mean) / (std + 1e-4) per prompt for grpo, r - mean for dr_grpo (ties: exactly 0)."""
    centred = (rewards[:, :, None] - rewards[:, None, :]).mean(2)  # r_i - mean, as a mean of differences: 0 on ties
    return centred / ((centred.pow(2).sum(1, keepdim=True) / (rewards.shape[1] - 1)).sqrt() + 1e-4) if loss_type == "grpo" else centred


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
    args.beta = 0.04 if args.beta is None else args.beta
    args.num_minibatches = exact_div(args.batch_size, args.minibatch_size, "--batch-size / --minibatch-size")
    args.num_prompts = exact_div(args.batch_size, args.num_completions, "--batch-size / --num-completions")
    if args.num_completions < 2 or not args.cliprange > 0:
        raise SystemExit(f"--num-completions must be >= 2 (a group) and --cliprange > 0, got {args.num_completions} and {args.cliprange}")
    if not args.missing_eos_penalty >= 0:
        raise SystemExit(f"--missing-eos-penalty must be >= 0 (0 turns it off), got {args.missing_eos_penalty}")
    if not args.beta >= 0:
        raise SystemExit(f"--beta must be >= 0 (the KL penalty's weight), got {args.beta}")

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
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
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

    def resumable():  # the run's state beyond the policy, its optimizer and the RNGs: what --resume restores (common.py)
        return dict(samples_seen=samples_seen, elapsed=time.time() - start, sampler=sampler, prompt_sampler=prompt_sampler)

    first, (samples_seen, elapsed, sampler, prompt_sampler) = resume(args, run_dir, policy, optimizer, resumable())
    start = time.time() - elapsed
    if first == 1:
        log(0, {})
    for iteration in range(first, args.num_iterations + 1):
        # ALGO LOGIC: draw B / C prompts, sample C completions each from pi_theta, score them, subtract the baseline
        batch = torch.randint(len(data), (args.num_prompts,), generator=prompt_sampler)  # uniform, with replacement
        prompts = pad_rows([data[i] for i in batch.tolist()], task.pad_token_id, left=True, device=device)
        queries = prompts.repeat_interleave(args.num_completions, dim=0)
        with torch.no_grad():
            responses, logps = generate(policy, queries, task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, sampler,
                                        args.compile)
            scores = task.proxy_reward(queries, responses)
            if task.eos_token_id is not None:
                scores -= args.missing_eos_penalty * (responses != task.eos_token_id).all(1)
            ref_logps, _ = response_logprobs(ref_policy, queries, responses, task.pad_token_id, task.eos_token_id, task.temperature)
            kl = (logps - ref_logps).sum(1).view(args.num_prompts, args.num_completions)  # log pi(y|x) - log pi_ref(y|x), [P, C]
            scores = scores.view(args.num_prompts, args.num_completions)
            advantages = group_advantages(scores, args.loss_type).flatten()  # [B]
        samples_seen += args.batch_size
        metrics = {"train/advantage_mean": advantages.mean().item(), "train/advantage_std": advantages.std(correction=0).item(),
                   "objective/kl": kl.mean().item(), "objective/proxy_reward": scores.mean().item()}
        if not advantages.any():  # every prompt's completions tied: nothing to learn from this batch
            log(iteration, metrics)
            continue

        # ALGO LOGIC: T passes of minibatch gradient steps over the batch
        stats = []
        for epoch in range(args.update_epochs):
            perm = torch.randperm(args.batch_size)
            for mb in perm.chunk(args.num_minibatches):
                mb, scale = shard(mb)  # this rank's share of the global minibatch (common.py)
                policy_logps, mask = response_logprobs(policy, queries[mb], responses[mb], task.pad_token_id, task.eos_token_id, task.temperature)
                loss, clipfrac, k3 = grpo_loss(policy_logps, logps[mb], ref_logps[mb], advantages[mb], mask, args.cliprange, args.beta,
                                               args.loss_type, task.max_new_tokens)
                loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global minibatch mean
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append([loss.item(), policy_logps.sum(1).mean().item(), grad_norm.item(), clipfrac.item(), k3.item()])
        s = np.mean(stats, axis=0)
        metrics.update(zip(["train/loss", "logps/policy", "train/grad_norm", "train/clipfrac", "train/kl"], s.tolist()))
        log(iteration, metrics)

    metrics_file.close()
    if args.track:
        wandb.finish()
    print(f"done in {time.time() - start:.0f}s: runs/{run_name}")


if __name__ == "__main__":
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        defaults = "; ".join(f"{t}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in d.items()) for t, d in TASK_DEFAULTS.items())
        main(tyro.cli(Args, description=f"{__doc__.splitlines()[0]}\n\nPer-task defaults (TASK_DEFAULTS; a flag given wins): {defaults}"))
