"""KTO (offline): Kahneman-Tversky Optimization: each response judged alone, desirable or not, against a KL baseline.

    loss = lambda_D * (1 - sigmoid(beta * (r - z0)))   for a desirable (chosen) response,   r = log pi(y|x) - log pi_ref(y|x)
           lambda_U * (1 - sigmoid(beta * (z0 - r)))   for an undesirable (rejected) one,   z0 = KL estimate, detached, >= 0

Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024 (arXiv 2402.01306), section 4; forked from dpo.py (docs/fork.md).
Axes: on-policy sampling NO (pairs were collected once, from pi_ref; their
reference log-probs are computed once, before training), sample reuse YES (the pairs come back every
pass over the dataset; `--update-epochs` T > 1 reuses each batch), negative gradient YES (undesirable responses).

Log-probs are sequence sums over response tokens (EOS included, pads never), scored at the sampling
temperature. A batch's B pairs are 2B examples, every chosen response (desirable), then every rejected one; `--unpaired`
keeps one of each pair, chosen or rejected at random (seeded, fixed for the run): no prompt's responses are compared.
As TRL's KTOTrainer: z0 is the mean of log pi - log pi_ref over mismatched pairs, prompt i with the response of example
i - 1 (the batch rotated by one), per minibatch, over every process, detached, clamped at 0 (`train/kl`); the loss is the
minibatch mean over examples; `rewards/*` are beta * r over the desirable / undesirable examples. Departures from TRL:
it rotates fixed slices of the dataset, here each batch, so the mismatched pairs change and their reference log-probs
are computed per batch; their policy log-probs come from the examples' forward pass (detached), not a second one.
Where a batch repeats a prompt (the bandits have 10), a mismatched pair can share its prompt, as in TRL.

    python algos/kto.py --task skew_length
    python algos/kto.py --task bandit_r1 --unpaired --desirable-weight 1.33
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
import torch.nn.functional as F
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
    batch_size: int = 32
    """B, preference pairs per iteration (`samples` counts responses read: 2 per pair, 1 with --unpaired)"""
    minibatch_size: int = 16
    """M, samples per gradient step"""
    update_epochs: int = 1
    """T, passes over each batch (sample reuse)"""
    learning_rate: Optional[float] = None
    """Adam learning rate; default per task, see TASK_DEFAULTS at the top of --help"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # Algorithm specific arguments
    beta: float = 0.1
    """KTO's beta: the scale of r = log pi - log pi_ref inside the sigmoid (risk aversion); TRL's default"""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a desirable (chosen) example's loss"""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of an undesirable (rejected) example's loss"""
    unpaired: bool = False
    """keep one response of each pair (chosen or rejected, at random, seeded): unpaired data, B examples per iteration, not 2B"""

    # to be filled in runtime (not flags; recorded in args.json)
    num_minibatches: tyro.conf.Suppress[int] = 0
    """B / M"""
    world_size: tyro.conf.Suppress[int] = 1
    """processes (torchrun); B and M are global: each process trains on its share of every minibatch"""


# tuned on each embedded task by the fork's own sweep (seeds 101 102, full length; docs/fork.md, section 6), not yet by study.py;
# a value given on the command line wins
TASK_DEFAULTS = {
    "bandit_r1": dict(num_iterations=100, learning_rate=3e-3),
    "bandit_r2": dict(num_iterations=100, learning_rate=1e-3),
    "min_length": dict(num_iterations=60, learning_rate=1e-4),
    "mode_length": dict(num_iterations=60, learning_rate=3e-4),
    "skew_length": dict(num_iterations=60, learning_rate=3e-3),
}

# how benchmarks/study.py and the tests run this script (docs/fork.md): a fork edits these three lines, nothing elsewhere
STUDY = dict(
    responses_per_row=lambda args: 1 if args.unpaired else 2,  # what `samples` counts per row of B: both responses of a pair, or one
    variants=["unpaired"],  # switches that make a method of their own, tuned and reported on their own
    knob=None,  # a strength the tuning sweeps beside the rate: (Args field, its untuned value), or None
)


def kto_loss(policy_logps, ref_logps, desirable, kl, beta, desirable_weight, undesirable_weight):
    """Per-example KTO losses from sequence log-probs [N], `desirable` [N] bool and the KL estimate z0 (clamped at 0, detached).
    Returns (losses, rewards), [N] each; the implicit rewards beta * (log pi - log pi_ref) detached, for logging.
    """
    r, kl = policy_logps - ref_logps, torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).clamp(min=0).detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),  # lambda_y - v(x, y)
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, (beta * r).detach()


def mismatched(responses):
    """The KL estimate's responses: example i gets the response of example i - 1, the batch rotated by one (TRL)."""
    return responses.roll(1, 0)


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
    for k, v in TASK_DEFAULTS.get(args.task, {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_iterations is None or args.learning_rate is None:  # the real tasks have no tuned defaults
        raise SystemExit(f"--task {args.task} has no tuned defaults: pass --num-iterations and --learning-rate")
    args.num_minibatches = exact_div(args.batch_size, args.minibatch_size, "--batch-size / --minibatch-size")
    if not args.beta > 0:
        raise SystemExit(f"--beta must be > 0, got {args.beta}")
    if not (args.desirable_weight > 0 and args.undesirable_weight > 0):
        raise SystemExit(f"--desirable-weight and --undesirable-weight must be > 0, got {args.desirable_weight} and {args.undesirable_weight}")

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
                     args.max_prompt_length, args.max_length, min_pairs=args.batch_size)  # too few --dataset rows fail before the build
    if len(task.preference_data) < args.batch_size:  # each iteration draws B distinct pairs of the fixed dataset
        raise SystemExit(f"--batch-size {args.batch_size}: the task has {len(task.preference_data)} preference pairs; pass at most that, or more pairs")
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

    # ALGO LOGIC: the fixed offline pairs, with reference log-probs computed once
    data = task.preference_data
    with torch.no_grad():
        ref_logps = []
        for s in range(0, len(data), 64):
            rows = data[s : s + 64]
            q = pad_rows(rows["prompt_ids"], task.pad_token_id, left=True, device=device)
            c = pad_rows(rows["chosen_ids"], task.pad_token_id, left=False, device=device)
            r = pad_rows(rows["rejected_ids"], task.pad_token_id, left=False, device=device)
            ref_logps.append(torch.stack(sequence_logprobs(ref_policy, task, q, c, r), 1))
        ref_logps = torch.cat(ref_logps)  # [N, 2]: chosen, rejected
    side = torch.from_numpy(np.random.default_rng(args.seed).integers(2, size=len(data)))  # --unpaired: each pair's one kept side
    keep = torch.stack([side == 0, side == 1], 1) if args.unpaired else torch.ones(len(data), 2, dtype=torch.bool)  # [N, 2]
    order, cursor = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)), 0

    def resumable():  # the run's state beyond the policy, its optimizer and the RNGs: what --resume restores (common.py)
        return dict(samples_seen=samples_seen, elapsed=time.time() - start, order=order, cursor=cursor)

    first, (samples_seen, elapsed, order, cursor) = resume(args, run_dir, policy, optimizer, resumable())
    start = time.time() - elapsed
    if first == 1:
        log(0, {})
    for iteration in range(first, args.num_iterations + 1):
        # ALGO LOGIC: draw B pairs from the fixed dataset (a fresh shuffle after each pass)
        if cursor + args.batch_size > len(data):
            order, cursor = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + iteration)), 0
        batch, cursor = order[cursor : cursor + args.batch_size], cursor + args.batch_size
        rows = data[batch.tolist()]
        queries = pad_rows(rows["prompt_ids"], task.pad_token_id, left=True, device=device)
        chosen = pad_rows(rows["chosen_ids"], task.pad_token_id, left=False, device=device)
        rejected = pad_rows(rows["rejected_ids"], task.pad_token_id, left=False, device=device)
        batch_ref = ref_logps[batch.to(device)]
        # ALGO LOGIC: the examples: every chosen response (desirable), then every rejected one; --unpaired keeps one per pair
        width = max(chosen.shape[1], rejected.shape[1])
        responses = torch.cat([F.pad(y, (0, width - y.shape[1]), value=task.pad_token_id) for y in (chosen, rejected)])
        kept = keep[batch].T.reshape(-1).to(device)  # [2B]
        queries, responses, batch_ref = torch.cat([queries, queries])[kept], responses[kept], batch_ref.T.reshape(-1)[kept]
        desirable = (torch.arange(2 * len(batch), device=device) < len(batch))[kept]
        samples_seen += len(desirable)  # responses read: 2 per pair, 1 with --unpaired
        kl_responses = mismatched(responses)
        with torch.no_grad():  # the mismatched pairs change with the batch: their reference log-probs are computed per batch
            kl_ref = response_logprobs(ref_policy, queries, kl_responses, task.pad_token_id, task.eos_token_id, task.temperature)[0].sum(1)

        # ALGO LOGIC: T passes of minibatch gradient steps over the batch
        stats = []
        for epoch in range(args.update_epochs):
            perm = torch.randperm(len(desirable))
            for mb in perm.chunk(args.num_minibatches):
                mb, scale = shard(mb)  # this rank's share of the global minibatch (common.py)
                logps, kl_logps = sequence_logprobs(policy, task, queries[mb], responses[mb], kl_responses[mb])  # one forward for both
                kl = max(all_reduce_mean({"kl": (kl_logps.detach() - kl_ref[mb]).mean().item()})["kl"], 0.0)  # z0: every rank's mean
                d = desirable[mb]
                losses, rewards = kto_loss(logps, batch_ref[mb], d, kl, args.beta, args.desirable_weight, args.undesirable_weight)
                loss = losses.mean()
                loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global minibatch mean
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                sums = all_reduce_mean({"n_d": d.sum().item(), "n_u": (~d).sum().item(), "logps_d": logps[d].sum().item(),  # over every
                                        "logps_u": logps[~d].sum().item(), "rewards_d": rewards[d].sum().item(),  # rank: a minibatch
                                        "rewards_u": rewards[~d].sum().item()})  # may hold no example of one kind
                stats.append([loss.item(), grad_norm.item(), kl, *sums.values()])
        loss, grad_norm, kl, n_d, n_u, logps_d, logps_u, rewards_d, rewards_u = np.mean(stats, axis=0).tolist()
        n_d, n_u = max(n_d, 1e-9), max(n_u, 1e-9)  # (no example of a kind: its statistics read 0)
        metrics = {"train/loss": loss, "logps/chosen": logps_d / n_d, "logps/rejected": logps_u / n_u,
                   "rewards/margins": rewards_d / n_d - rewards_u / n_u, "rewards/chosen": rewards_d / n_d, "rewards/rejected": rewards_u / n_u,
                   "train/grad_norm": grad_norm, "train/kl": kl}
        log(iteration, metrics)

    metrics_file.close()
    if args.track:
        wandb.finish()
    print(f"done in {time.time() - start:.0f}s: runs/{run_name}")


if __name__ == "__main__":
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        defaults = "; ".join(f"{t}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in d.items()) for t, d in TASK_DEFAULTS.items())
        main(tyro.cli(Args, description=f"{__doc__.splitlines()[0]}\n\nPer-task defaults (TASK_DEFAULTS; a flag given wins): {defaults}"))
