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
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import disable_dropout, pad_rows, unpadded_groups  # noqa: E402


@dataclass
class Args:
    exp_name: str = "reward_model"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = False
    """train on CUDA"""
    threads: int = 1
    """torch CPU threads (2 threads on a busy 2-core machine are far slower than 1)"""
    model: str = ""
    """the model to start from (usually the SFT policy): a local directory or a hub id"""
    dataset: str = ""
    """preference pairs (prompt, chosen, rejected columns): a .json/.jsonl file, a directory, or a hub id (`id[:config][@split]`)"""
    split: str = "train"
    """dataset split"""
    max_length: int = 512
    """prompt and responses are each truncated to this many tokens"""
    learning_rate: float = 1e-5
    """AdamW learning rate (linear decay to 0)"""
    num_epochs: int = 1
    """passes over the pairs"""
    minibatch_size: int = 16
    """pairs per gradient step"""
    eval_fraction: float = 0.1
    """share of pairs held out for the pairwise accuracy"""
    output_dir: str = ""
    """where to save the model (default runs/reward_model__{seed}__{time})"""


def reward_scores(reward_model, queries, responses, pad_token_id):
    """r_phi(x, y) for left-padded queries [B, Lq] and right-padded responses [B, Lr] -> [B] fp32.

    The classifier reads its score at the last non-pad token: the response's EOS (or its last token). No
    compute on padding: the forward runs on `common.unpadded_groups`, rows cut to their real tokens and
    grouped by length; equal to the padded batch's scores to float rounding (tests/test_common.py)."""
    scores, order = [], []
    for group, rows, kwargs, _, _ in unpadded_groups(queries, responses, responses != pad_token_id, pad_token_id):
        scores.append(reward_model(input_ids=rows, **kwargs).logits[:, 0].float())
        order.append(group)
    return torch.cat(scores)[torch.cat(order).argsort()]


def _pair_scores(reward_model, pairs, pad_token_id, device):
    q = pad_rows([p[0] for p in pairs] * 2, pad_token_id, left=True, device=device)
    r = pad_rows([p[1] for p in pairs] + [p[2] for p in pairs], pad_token_id, left=False, device=device)
    chosen, rejected = reward_scores(reward_model, q, r, pad_token_id).chunk(2)
    return chosen, rejected


@torch.no_grad()
def pairwise_accuracy(reward_model, pairs, pad_token_id, minibatch_size=64):
    """Share of (query, chosen, rejected) pairs with r(chosen) > r(rejected)."""
    device = next(reward_model.parameters()).device
    reward_model.eval()
    right = 0
    for s in range(0, len(pairs), minibatch_size):
        chosen, rejected = _pair_scores(reward_model, pairs[s : s + minibatch_size], pad_token_id, device)
        right += int((chosen > rejected).sum())
    return right / max(len(pairs), 1)


def reward_model_train(reward_model, pairs, pad_token_id, learning_rate, num_epochs, minibatch_size, seed, progress=None):
    """Bradley-Terry on (query_ids, chosen_ids, rejected_ids) triples. Returns per-epoch mean loss."""
    device = next(reward_model.parameters()).device
    reward_model.train()
    disable_dropout(reward_model)
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=learning_rate, weight_decay=0.0)
    total = num_epochs * math.ceil(len(pairs) / minibatch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    g = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for _ in range(num_epochs):
        order, losses = torch.randperm(len(pairs), generator=g).tolist(), []
        for s in range(0, len(order), minibatch_size):
            chosen, rejected = _pair_scores(reward_model, [pairs[i] for i in order[s : s + minibatch_size]], pad_token_id, device)
            loss = -F.logsigmoid(chosen - rejected).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reward_model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if progress is not None:
                progress(step, total, loss.item())
        history.append(sum(losses) / len(losses))
    reward_model.eval()
    return history


def main(args: Args):
    from tasks import load_reward_model, load_rows, step_bar

    if not args.model or not args.dataset:
        raise SystemExit("reward_model.py: pass --model (local directory or hub id) and --dataset (file, directory or hub id)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    reward_model, tokenizer = load_reward_model(args.model, device)
    rows = load_rows(args.dataset, args.split, ["prompt", "chosen", "rejected"])

    def ids(text, room):
        return tokenizer(text)["input_ids"][:room]

    pairs = [(ids(r["prompt"], args.max_length), ids(r["chosen"], args.max_length - 1) + [tokenizer.eos_token_id],
              ids(r["rejected"], args.max_length - 1) + [tokenizer.eos_token_id]) for r in rows]
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_eval = int(len(pairs) * args.eval_fraction)
    eval_pairs, train_pairs = [pairs[i] for i in perm[:n_eval]], [pairs[i] for i in perm[n_eval:]]
    out = Path(args.output_dir or f"runs/{args.exp_name}__{args.seed}__{int(time.time())}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2))
    history = reward_model_train(reward_model, train_pairs, tokenizer.pad_token_id, args.learning_rate, args.num_epochs,
                                 args.minibatch_size, args.seed, step_bar("reward model"))
    accuracy = pairwise_accuracy(reward_model, eval_pairs, tokenizer.pad_token_id) if eval_pairs else float("nan")
    reward_model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    (out / "metrics.json").write_text(json.dumps({"train/loss_per_epoch": history, "eval/pairwise_accuracy": accuracy}))
    print(f"saved {out / 'model'}; held-out pairwise accuracy {accuracy:.3f} on {len(eval_pairs)} pairs")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(tyro.cli(Args))
