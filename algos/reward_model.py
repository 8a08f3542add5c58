"""Bradley-Terry reward model: how every proxy reward is made.

    loss = - log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))

r_phi is a Hugging Face sequence classifier with one output, read at the last non-pad token (the
EOS of the response), initialised from the SFT policy as in the study. The embedded length tasks
train their proxy reward with `reward_model_train` below (tasks/length.py); this file is also a
standalone script for your own model and preference data:

    python algos/reward_model.py --model path/to/sft_model --dataset path/to/prefs.jsonl --cuda
    python algos/reward_model.py --model EleutherAI/pythia-160m \
        --dataset Asap7772/relabeled_alpacafarm_pythiasft_20K_preference_data_minlength --cuda

Chosen and rejected go through one forward pass (concatenated on the batch axis).

Under torchrun (docs/scaling.md) --minibatch-size stays global: every rank draws the same order and trains on its
`shard` of each minibatch (DDP, or FSDP2 with --fsdp), so N processes take the same steps as one, up to float reduction
order; rank 0 alone prints and writes the output directory: args.json, metrics.jsonl (a row per step), metrics.json (the
loss per epoch, the held-out accuracy) and model/, a checkpoint saved every --save-every steps and at the end
(common.save_checkpoint). `--resume runs/<run>` goes on from it, as if never stopped (CPU: bit for bit).

    torchrun --nproc-per-node 8 algos/reward_model.py --model path/to/sft_model --dataset path/to/prefs.jsonl --cuda --bf16
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import disable_dropout, pad_rows, unpadded_groups  # noqa: E402
from common import all_reduce_mean, distributed, forward, lockstep, open_metrics, resume, save_checkpoint, shard, start_run  # noqa: E402
from common import user_errors, world, wrap  # noqa: E402


@dataclass
class Args:
    exp_name: str = "reward_model"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = False
    """train on CUDA"""
    fsdp: bool = False
    """under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP (docs/scaling.md)"""
    bf16: bool = False
    """forward passes under bf16 autocast (fp32 weights and Adam state); for CUDA"""
    resume: Optional[str] = None
    """continue the run in this directory (runs/<run> or --output-dir) from its latest checkpoint; its args.json gives every
    other argument (a flag given as well must agree with it, but --threads and --save-every may change)"""
    threads: int = 1
    """torch CPU threads (2 threads on a busy 2-core machine are far slower than 1)"""
    model: str = ""
    """the model to start from (usually the SFT policy): a local directory or a hub id"""
    dataset: str = ""
    """preference pairs: `prompt`, `chosen`, `rejected` (text or chat messages), AlpacaFarm's or the study's relabelled
    schema (tasks/preferences.py; ties dropped); a .json/.jsonl file, a directory, or a hub id (`id[:config][@split]`)"""
    split: str = "train"
    """dataset split"""
    max_prompt_length: int = 256
    """a longer prompt keeps its last this many tokens"""
    max_length: int = 512
    """prompt + response tokens at most (a longer response is cut)"""
    learning_rate: float = 1e-5
    """AdamW learning rate (linear decay to 0)"""
    num_epochs: int = 1
    """passes over the pairs"""
    minibatch_size: int = 16
    """pairs per gradient step"""
    eval_fraction: float = 0.1
    """share of pairs held out for the pairwise accuracy"""
    save_every: int = 500
    """save a checkpoint (output dir's model/, resumable) every this many steps, and at the end"""
    output_dir: str = ""
    """where to save the model (default runs/reward_model__{seed}__{time})"""

    # to be filled in runtime (not flags; recorded in args.json)
    world_size: tyro.conf.Suppress[int] = 1
    """processes (torchrun); --minibatch-size is global: each process trains on its share of every minibatch"""


def reward_scores(reward_model, queries, responses, pad_token_id):
    """r_phi(x, y) for left-padded queries [B, Lq] and right-padded responses [B, Lr] -> [B] fp32.

    The classifier reads its score at the last non-pad token: the response's EOS (or its last token). No
    compute on padding: the forward runs on `common.unpadded_groups`, rows cut to their real tokens and
    grouped by length; equal to the padded batch's scores to float rounding (tests/test_common.py).
    A model given to `common.wrap` runs through its wrapper: DDP sees the forward, FSDP2 gathers the shards."""
    scores, order = [], []
    for group, rows, kwargs, _, _ in unpadded_groups(queries, responses, responses != pad_token_id, pad_token_id):
        scores.append(forward(reward_model, input_ids=rows, **kwargs).logits[:, 0].float())
        order.append(group)
    lockstep(reward_model, len(order), input_ids=rows[:1, :1], position_ids=kwargs["position_ids"][:1, :1])  # FSDP2 (common.py)
    return torch.cat(scores)[torch.cat(order).argsort()]


def _pair_scores(reward_model, pairs, pad_token_id, device):
    q = pad_rows([p[0] for p in pairs] * 2, pad_token_id, left=True, device=device)
    r = pad_rows([p[1] for p in pairs] + [p[2] for p in pairs], pad_token_id, left=False, device=device)
    chosen, rejected = reward_scores(reward_model, q, r, pad_token_id).chunk(2)
    return chosen, rejected


@torch.no_grad()
def pairwise_accuracy(reward_model, pairs, pad_token_id, minibatch_size=64):
    """Share of (query, chosen, rejected) pairs with r(chosen) > r(rejected). Under torchrun every rank scores every pair."""
    device = next(reward_model.parameters()).device
    reward_model.eval()
    right = 0
    for s in range(0, len(pairs), minibatch_size):
        chosen, rejected = _pair_scores(reward_model, pairs[s : s + minibatch_size], pad_token_id, device)
        right += int((chosen > rejected).sum())
    return right / max(len(pairs), 1)


def reward_model_train(reward_model, pairs, pad_token_id, learning_rate, num_epochs, minibatch_size, seed, progress=None, run=None):
    """Bradley-Terry on (query_ids, chosen_ids, rejected_ids) triples. Returns per-epoch mean loss.

    A model given to `common.wrap` under torchrun trains on this rank's `shard` of every (global) minibatch and the loss
    is averaged over ranks; any other model, such as a task builder's (built by one rank while the others wait on the
    cache lock), trains alone on every minibatch, with no collective.
    run: the script's (args, run_dir, tokenizer): a metrics row per step, a checkpoint every args.save_every steps and at
    the last, and with args.resume the steps after the latest checkpoint (common.py). The task builders pass none."""
    device = next(reward_model.parameters()).device
    spread = distributed(reward_model)  # given to wrap under torchrun
    reward_model.train()
    disable_dropout(reward_model)
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(pairs) / minibatch_size)
    total = num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(pairs), generator=g).tolist() for _ in range(num_epochs)]  # each epoch's order
    args, run_dir, tokenizer = run or (None, None, None)
    metrics_file = open_metrics(run_dir, args) if run else None  # rank 0 writes; --resume appends
    state = dict(history=[], losses=[])  # the mean loss per finished epoch, and the current epoch's losses
    first, (history, losses) = resume(args, run_dir, reward_model, optimizer, state) if run else (1, state.values())
    for _ in range(first - 1):  # --resume: the learning rate where the checkpoint left it
        scheduler.step()
    for step in range(first, total + 1):
        epoch, s = divmod(step - 1, steps_per_epoch)
        idx, scale = orders[epoch][s * minibatch_size : (s + 1) * minibatch_size], 1.0
        if spread:  # this rank's share of the global minibatch (common.py)
            idx, scale = shard(torch.tensor(idx))
        chosen, rejected = _pair_scores(reward_model, [pairs[i] for i in idx], pad_token_id, device)
        loss = -F.logsigmoid(chosen - rejected).mean()
        loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global minibatch mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward_model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        # each rank's loss is its share of the minibatch mean: their mean over ranks is the minibatch's, held by every rank
        step_loss = all_reduce_mean({"loss": loss.item()})["loss"] if spread else loss.item()
        losses.append(step_loss)
        if progress is not None:
            progress(step, total, loss.item())
        if s == steps_per_epoch - 1:  # the epoch's last step
            history.append(sum(losses) / len(losses))
            losses = []
        if run:
            row = {"iteration": step, "epoch": epoch + 1, "train/loss": step_loss}
            if step % args.save_every == 0 or step == total:
                save_checkpoint(run_dir, reward_model, optimizer, tokenizer, row, dict(history=history, losses=losses))
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
    reward_model.eval()
    return history


def main(args: Args):
    from tasks import load_reward_model, load_split, step_bar
    from tasks.preferences import load_pairs, schema_of

    _, out = start_run(args, f"{args.exp_name}__{args.seed}__{int(time.time())}")  # torchrun, --resume; checks the arguments
    if not args.model or not args.dataset:
        raise SystemExit("reward_model.py: pass --model (local directory or hub id) and --dataset (file, directory or hub id)")
    if not (0 <= args.eval_fraction < 1 and args.max_prompt_length < args.max_length):
        raise SystemExit(f"need 0 <= --eval-fraction < 1 and --max-prompt-length < --max-length (room for a response), got "
                         f"{args.eval_fraction}, {args.max_prompt_length} and {args.max_length}")
    rank = world()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    schema_of(load_split(args.dataset, args.split), args.dataset)  # one-line errors before the model loads
    reward_model, tokenizer = load_reward_model(args.model, device)
    reward_model = wrap(reward_model, args)  # under torchrun: DDP (or FSDP2); --bf16: autocast
    data, _, _ = load_pairs(args.dataset, args.split, tokenizer, False, args.max_prompt_length, args.max_length)
    pairs = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = int(len(pairs) * args.eval_fraction)
    eval_pairs, train_pairs = [pairs[i] for i in perm[:n_eval]], [pairs[i] for i in perm[n_eval:]]
    if len(train_pairs) < args.minibatch_size:
        raise SystemExit(f"--minibatch-size {args.minibatch_size}: dataset {args.dataset!r} leaves {len(train_pairs)} training pairs; "
                         f"pass at most that")
    history = reward_model_train(reward_model, train_pairs, tokenizer.pad_token_id, args.learning_rate, args.num_epochs,
                                 args.minibatch_size, args.seed, step_bar("reward model") if rank == 0 else None, (args, out, tokenizer))
    accuracy = pairwise_accuracy(reward_model, eval_pairs, tokenizer.pad_token_id) if eval_pairs else float("nan")
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps({"train/loss_per_epoch": history, "eval/pairwise_accuracy": accuracy}))
    print(f"saved {out / 'model'}; held-out pairwise accuracy {accuracy:.3f} on {len(eval_pairs)} pairs")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        main(tyro.cli(Args))
