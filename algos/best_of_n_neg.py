"""Best-of-N + negative gradient: maximum likelihood on the best of C completions, the worst pushed down.

    loss = -(1 / |y_best|) * log pi(y_best|x) + beta * max((1 / |y_worst|) * log pi(y_worst|x), floor)

Iterated Best-of-N plus the negative gradient, the study's claim 3 ("it beats plain Best-of-N")
(Tajwar et al. 2024, docs/paper.md sections 2 and 4). Each
iteration samples C completions for each of B / C prompts from pi_theta, ranks them with the task's
proxy reward, pairs the best with the worst, drops pairs whose reward gap is <= a threshold, and
takes token-mean steps raising log pi(y_best) and lowering log pi(y_worst) (`--all-worse`: each one
below the best, one pair each). Axes: on-policy sampling YES, sample reuse only with T > 1, negative
gradient YES. The term alone is unbounded below (log pi(y_worst) -> -inf; offline with beta 1 it wrecks
min_length): it is clamped at `--logp-floor` nats per token, so a completion below it gets no gradient.
`--offline`, an offline variant (not in the study): the C completions of every train prompt are sampled
once from the frozen pi_ref (with the run's seed) before training, and reused: on-policy sampling NO,
sample reuse YES. Both modes draw B / C prompts per iteration and count their B completions in
`samples` (offline: those from the one collection), so the two compare at equal budgets.

Departure (issue 27): a prompt whose best completion never emits EOS is dropped, as a tie is. TRL's OnlineDPOTrainer only
subtracts `--missing-eos-penalty`, which cancels when none of a prompt's C completions ends: the proxy's score on responses it
never saw then picks the best (on skew_length 64-token loops score up to +4.5, near the empty response's +5.3), and a policy
that had lost EOS climbed it to KL 500 and never recovered.

Log-probs are sequence sums over response tokens (EOS included, pads never), scored at the sampling
temperature. Deviation from the study: C = 4 completions per prompt, not its bandit's N = 10 (C must
divide B = 64, and 4 keeps 16 prompts per iteration); its bandit sums log-probs, a fixed 9-token scale.

    python algos/best_of_n_neg.py --task min_length
    python algos/best_of_n_neg.py --task bandit_r1 --offline --all-worse
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
from common import exact_div, generate, pad_rows, response_logprobs, response_mask  # noqa: E402
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
    offline: bool = False
    """offline Best-of-N: the C completions of every train prompt are sampled once from pi_ref, before training"""
    beta: float = 0.1
    """weight of the negative term beta * (1 / |y_worst|) * log pi(y_worst|x)"""
    logp_floor: float = -5.0
    """the negative term stops (no gradient) once a worse completion's token-mean log-prob is below this"""
    all_worse: bool = False
    """push down every completion worse than the best (mean of their terms), not only the worst"""
    reward_gap_threshold: float = 0.0
    """pairs whose proxy-reward gap (best - worst) is <= this are dropped"""
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
    "bandit_r1": dict(num_iterations=100, learning_rate=3e-2),
    "bandit_r2": dict(num_iterations=100, learning_rate=3e-2),
    "min_length": dict(num_iterations=60, learning_rate=1e-3),
    "mode_length": dict(num_iterations=60, learning_rate=3e-3),
    "skew_length": dict(num_iterations=60, learning_rate=1e-3),
}
OFFLINE_LEARNING_RATES = dict(bandit_r1=3e-4, bandit_r2=1e-2, min_length=1e-3, mode_length=1e-4, skew_length=1e-3)  # with --offline

# how benchmarks/study.py and the tests run this script (docs/fork.md): a fork edits these three lines, nothing elsewhere
STUDY = dict(
    responses_per_row=lambda args: 1,  # what `samples` counts per row of B: each of the B completions
    variants=[],  # switches that make a method of their own, tuned and reported on their own
    knob=("beta", 0.1),  # a strength the tuning sweeps beside the rate: (Args field, its untuned value), or None
)


def best_of_n_loss(policy_logps, lengths):
    """Per-prompt token-mean NLL of the best completion: [P] summed log-probs, [P] token counts -> [P]."""
    return -policy_logps / lengths.clamp(min=1)


def negative_loss(worse_logps, worse_lengths, beta, logp_floor):
    """beta * token-mean log-prob of a worse completion, clamped below at logp_floor: [P] summed log-probs, [P] token counts -> [P]."""
    return beta * (worse_logps / worse_lengths.clamp(min=1)).clamp(min=logp_floor)


def sequence_logprobs(model, task, queries, chosen, rejected):
    """Summed response log-probs of chosen and rejected in one forward pass -> ([P], [P])."""
    width = max(chosen.shape[1], rejected.shape[1])  # right-pad both to one width
    chosen, rejected = (torch.nn.functional.pad(y, (0, width - y.shape[1]), value=task.pad_token_id) for y in (chosen, rejected))
    logps, _ = response_logprobs(model, torch.cat([queries, queries]), torch.cat([chosen, rejected]),
                                 task.pad_token_id, task.eos_token_id, task.temperature)
    return logps.sum(1).chunk(2)


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
    if args.offline and args.learning_rate is None:  # --offline has its own tuned learning rates
        args.learning_rate = OFFLINE_LEARNING_RATES[args.task]
    for k, v in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_iterations is None or args.learning_rate is None:  # the real tasks have no tuned defaults
        raise SystemExit(f"--task {args.task} has no tuned defaults: pass --num-iterations and --learning-rate")
    args.num_minibatches = exact_div(args.batch_size, args.minibatch_size, "--batch-size / --minibatch-size")
    args.num_prompts = exact_div(args.batch_size, args.num_completions, "--batch-size / --num-completions")
    if args.num_completions < 2:
        raise SystemExit(f"--num-completions must be >= 2 to form a pair, got {args.num_completions}")
    if not (args.reward_gap_threshold >= 0 and args.missing_eos_penalty >= 0):
        raise SystemExit(f"--reward-gap-threshold and --missing-eos-penalty must be >= 0, got {args.reward_gap_threshold} and {args.missing_eos_penalty}")
    if not (args.beta >= 0 and args.logp_floor < 0):
        raise SystemExit(f"--beta must be >= 0 and --logp-floor < 0 (a floor on token-mean log-probs), got {args.beta} and {args.logp_floor}")

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

    if args.offline:  # the C completions of every train prompt, sampled once from the frozen pi_ref, B at a time
        pool = torch.full((len(data), args.num_completions, task.max_new_tokens), task.pad_token_id, device=device)
        for s in range(0, len(data), args.num_prompts):
            queries = pad_rows(data[s : s + args.num_prompts], task.pad_token_id, left=True, device=device).repeat_interleave(args.num_completions, 0)
            responses, _ = generate(ref_policy, queries, task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, sampler)
            pool[s : s + args.num_prompts, :, : responses.shape[1]] = responses.view(-1, args.num_completions, responses.shape[1])

    first, (samples_seen, elapsed, sampler, prompt_sampler) = resume(args, run_dir, policy, optimizer, resumable())
    start = time.time() - elapsed
    if first == 1:
        log(0, {})
    for iteration in range(first, args.num_iterations + 1):
        # ALGO LOGIC: draw B / C prompts, sample C completions each from pi_theta, rank by the proxy reward
        batch = torch.randint(len(data), (args.num_prompts,), generator=prompt_sampler)  # uniform, with replacement
        prompts = pad_rows([data[i] for i in batch.tolist()], task.pad_token_id, left=True, device=device)
        queries = prompts.repeat_interleave(args.num_completions, dim=0)
        with torch.no_grad():
            if args.offline:  # these prompts' completions from the one pi_ref collection
                responses = pool[batch.to(device)].flatten(0, 1)
            else:
                responses, _ = generate(policy, queries, task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, sampler,
                                        args.compile)
            scores = task.proxy_reward(queries, responses)
            if task.eos_token_id is not None:
                scores -= args.missing_eos_penalty * (responses != task.eos_token_id).all(1)
            scores = scores.view(args.num_prompts, args.num_completions)
            best, worst = scores.argmax(1), scores.argmin(1)
            keep = (scores.max(1).values - scores.min(1).values) > args.reward_gap_threshold
            responses = responses.view(args.num_prompts, args.num_completions, -1)
            if task.eos_token_id is not None:  # a best that never ends is no example to follow: the reward model never saw one
                keep &= (responses[torch.arange(args.num_prompts, device=device), best] == task.eos_token_id).any(1)
            worse = (scores < scores.amax(1, keepdim=True)) if args.all_worse else torch.nn.functional.one_hot(worst, args.num_completions).bool()
            rows, cols = (worse & keep[:, None]).nonzero(as_tuple=True)  # [P, C] -> one (best, worse) pair per row
            queries, chosen, rejected = prompts[rows], responses[rows, best[rows]], responses[rows, cols]
            chosen_lengths = response_mask(chosen, task.pad_token_id, task.eos_token_id).sum(1)  # [P] tokens of the best, EOS included
            rejected_lengths = response_mask(rejected, task.pad_token_id, task.eos_token_id).sum(1)
        n_pairs = len(rows)
        samples_seen += args.batch_size
        if n_pairs == 0:  # every prompt's completions tied or its best never ended: nothing to learn from this batch
            log(iteration, {"train/pairs_kept": 0.0, "objective/proxy_reward": scores.mean().item()})
            continue

        # ALGO LOGIC: T passes of minibatch gradient steps over the batch
        stats = []
        for epoch in range(args.update_epochs):
            perm = torch.randperm(n_pairs)
            for mb in perm.chunk(args.num_minibatches):
                mb, scale = shard(mb)  # this rank's share of the global minibatch (common.py)
                chosen_logps, rejected_logps = sequence_logprobs(policy, task, queries[mb], chosen[mb], rejected[mb])
                losses = best_of_n_loss(chosen_logps, chosen_lengths[mb])
                losses = losses + negative_loss(rejected_logps, rejected_lengths[mb], args.beta, args.logp_floor)  # the negative gradient
                loss = losses.mean()
                loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global minibatch mean
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                stats.append([loss.item(), chosen_logps.mean().item(), rejected_logps.mean().item(), grad_norm.item()])
        s = np.mean(stats, axis=0)
        metrics = dict(zip(["train/loss", "logps/best", "logps/worst", "train/grad_norm"], s.tolist()))
        metrics.update({"train/pairs_kept": n_pairs / args.num_prompts, "objective/proxy_reward": scores.mean().item()})
        log(iteration, metrics)

    metrics_file.close()
    if args.track:
        wandb.finish()
    print(f"done in {time.time() - start:.0f}s: runs/{run_name}")


if __name__ == "__main__":
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        defaults = "; ".join(f"{t}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in d.items()) for t, d in TASK_DEFAULTS.items())
        main(tyro.cli(Args, description=f"{__doc__.splitlines()[0]}\n\nPer-task defaults (TASK_DEFAULTS; a flag given wins): {defaults}"))
