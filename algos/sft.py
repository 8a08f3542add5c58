"""Supervised fine-tuning (maximum likelihood on demonstrations): how every reference policy is made.

    loss = - mean over response tokens of log pi_theta(y_t | x, y_<t)        (token mean; pads masked)

The embedded tasks build their reference policy pi_ref with `sft_train` below (tasks/length.py,
tasks/bandit.py); this file is also a standalone script for your own model and data:

    python algos/sft.py --model EleutherAI/pythia-1.4b --dataset tatsu-lab/alpaca_farm:alpaca_instructions@sft \
        --response-column output --cuda --output-dir runs/pythia_sft
    python algos/sft.py --model path/to/local_model --dataset path/to/data.jsonl --output-dir runs/my_sft
    torchrun --nproc-per-node 8 algos/sft.py --model EleutherAI/pythia-1.4b \
        --dataset tatsu-lab/alpaca_farm:alpaca_instructions@sft --response-column output --cuda --bf16 --fsdp

Under torchrun (docs/scaling.md) --minibatch-size stays global: every rank draws the same order and trains on its
`shard` of each minibatch (DDP, or FSDP2 with --fsdp), so N processes take the same steps as one, up to float reduction
order; rank 0 alone prints and writes the output directory: args.json, metrics.jsonl (a row per step), metrics.json (the
NLL per epoch) and model/, a checkpoint saved every --save-every steps and at the end (common.save_checkpoint: the model,
its tokenizer, AdamW and the run's counters). `--resume runs/<run>` goes on from it, as if never stopped (CPU: bit for bit).

The prompt is not trained on (loss on response tokens only); EOS is appended to every response so
the model learns to stop, and the pad token is a dedicated token (added if the tokenizer lacks one).
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
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import disable_dropout, pad_rows, response_logprobs, response_mask  # noqa: E402
from common import all_reduce_mean, distributed, open_metrics, resume, save_checkpoint, shard, start_run, user_errors, world, wrap  # noqa: E402


@dataclass
class Args:
    exp_name: str = "sft"
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
    """the model to fine-tune: a local directory or a hub id"""
    dataset: str = ""
    """the demonstrations: a local .json/.jsonl file, a `save_to_disk` directory, or a hub id (`id[:config][@split]`)"""
    split: str = "train"
    """dataset split"""
    prompt_column: str = "prompt"
    """column holding the prompt text; without it, AlpacaFarm's instruction [+ input] in the study's template"""
    response_column: str = "response"
    """column holding the demonstration text"""
    max_length: int = 512
    """prompt and response are each truncated to this many tokens"""
    learning_rate: float = 1e-5
    """AdamW learning rate (linear decay to 0)"""
    num_epochs: int = 1
    """passes over the demonstrations"""
    minibatch_size: int = 16
    """demonstrations per gradient step"""
    save_every: int = 500
    """save a checkpoint (output dir's model/, resumable) every this many steps, and at the end"""
    output_dir: str = ""
    """where to save the model (default runs/sft__{seed}__{time})"""

    # to be filled in runtime (not flags; recorded in args.json)
    world_size: tyro.conf.Suppress[int] = 1
    """processes (torchrun); --minibatch-size is global: each process trains on its share of every minibatch"""


def sft_train(model, queries, responses, pad_token_id, eos_token_id, learning_rate, num_epochs, minibatch_size, seed, progress=None,
              run=None):
    """Maximum likelihood on (query, response) token lists; responses end with EOS where they stop.

    Returns the per-epoch mean token NLL. `progress`: an optional callable(step, total, loss).
    A model given to `common.wrap` under torchrun trains on this rank's `shard` of every (global) minibatch and the NLL
    is summed over ranks; any other model, such as a task builder's (built by one rank while the others wait on the
    cache lock), trains alone on every minibatch, with no collective.
    run: the script's (args, run_dir, tokenizer): a metrics row per step, a checkpoint every args.save_every steps and at
    the last, and with args.resume the steps after the latest checkpoint (common.py). The task builders pass none.
    """
    device = next(model.parameters()).device
    spread = distributed(model)  # given to wrap under torchrun
    model.train()
    disable_dropout(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(queries) / minibatch_size)
    total = num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(queries), generator=g).tolist() for _ in range(num_epochs)]  # each epoch's order
    args, run_dir, tokenizer = run or (None, None, None)
    metrics_file = open_metrics(run_dir, args) if run else None  # rank 0 writes; --resume appends
    state = dict(history=[], nll=0.0, tokens=0)  # the NLL per finished epoch, and the current epoch's sums
    first, (history, nll, tokens) = resume(args, run_dir, model, optimizer, state) if run else (1, state.values())
    for _ in range(first - 1):  # --resume: the learning rate where the checkpoint left it
        scheduler.step()
    for step in range(first, total + 1):
        epoch, s = divmod(step - 1, steps_per_epoch)
        idx = orders[epoch][s * minibatch_size : (s + 1) * minibatch_size]
        q = pad_rows([queries[i] for i in idx], pad_token_id, left=True, device=device)
        r = pad_rows([responses[i] for i in idx], pad_token_id, left=False, device=device)
        mb, scale = slice(None), 1.0
        if spread:  # this rank's share of the global minibatch, weighted by its tokens (the loss is a token mean; common.py)
            mb, scale = shard(torch.arange(len(idx)), response_mask(r, pad_token_id, eos_token_id).sum(1))
        logps, mask = response_logprobs(model, q[mb], r[mb], pad_token_id, eos_token_id)
        loss = -logps.sum() / mask.sum().clamp(min=1)  # token mean over the minibatch
        loss = loss * scale  # DDP averages gradients over ranks: that average is the gradient of the global token mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step_nll, step_tokens = (-logps.sum().item(), int(mask.sum())) if scale > 0 else (0.0, 0)  # (a rank with no rows: not counted)
        if spread:  # sums over ranks (their means: the same ratio), so that every rank holds what a checkpoint saves
            step_nll, step_tokens = all_reduce_mean({"nll": step_nll, "tokens": step_tokens}).values()
        nll, tokens = nll + step_nll, tokens + step_tokens
        if progress is not None:
            progress(step, total, loss.item())
        if s == steps_per_epoch - 1:  # the epoch's last step
            history.append(nll / max(tokens, 1))
            nll, tokens = 0.0, 0
        if run:
            row = {"iteration": step, "epoch": epoch + 1, "train/nll": step_nll / max(step_tokens, 1)}
            if step % args.save_every == 0 or step == total:
                save_checkpoint(run_dir, model, optimizer, tokenizer, row, dict(history=history, nll=nll, tokens=tokens))
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
    model.eval()
    return history


def main(args: Args):
    from tasks import load_causal_lm, load_rows, prompt_text, step_bar

    _, out = start_run(args, f"{args.exp_name}__{args.seed}__{int(time.time())}")  # torchrun, --resume; checks the arguments
    if not args.model or not args.dataset:
        raise SystemExit("sft.py: pass --model (local directory or hub id) and --dataset (file, directory or hub id)")
    rank = world()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    rows = load_rows(args.dataset, args.split, [args.response_column])
    if len(rows) < args.minibatch_size:
        raise SystemExit(f"--minibatch-size {args.minibatch_size}: dataset {args.dataset!r} has {len(rows)} demonstrations; pass at most that")
    model, tokenizer = load_causal_lm(args.model, device)
    model = wrap(model, args)  # under torchrun: DDP (or FSDP2); --bf16: autocast
    queries = [tokenizer(prompt_text(r, args.prompt_column))["input_ids"][-args.max_length :] for r in rows]
    responses = [tokenizer(r[args.response_column])["input_ids"][: args.max_length - 1] + [tokenizer.eos_token_id] for r in rows]
    history = sft_train(model, queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id, args.learning_rate,
                        args.num_epochs, args.minibatch_size, args.seed, step_bar("sft") if rank == 0 else None, (args, out, tokenizer))
    if rank == 0:
        (out / "metrics.json").write_text(json.dumps({"train/nll_per_epoch": history}))
    print(f"saved {out / 'model'}; token NLL per epoch: {[round(h, 4) for h in history]}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with user_errors():  # a bad argument or input: one line on stderr, exit code 2 (common.py)
        main(tyro.cli(Args))
