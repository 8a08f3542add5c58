"""Claim 8, the study's mode-seeking toy: reverse vs forward KL on one categorical distribution.

A categorical q = softmax(theta) over the bandit's 100 tokens is fitted to a bimodal target p by exact
gradient descent on its logits, once on the forward KL (maximum likelihood, mode-covering) and once on
the reverse KL (what on-policy and negative-gradient methods descend, mode-seeking):

    forward   KL(p || q) = sum_i p_i log(p_i / q_i)     d/dtheta_i = q_i - p_i
    reverse   KL(q || p) = sum_i q_i log(q_i / p_i)     d/dtheta_i = q_i * (log(q_i / p_i) - KL(q || p))

p puts 80% of its mass on a mode at token 70 (the target, where the bandit's R1 reward peaks) and 20%
on a mode at token 20. Two starts: pi_data, the bandit's reference distribution (about 4% of its mass
near token 70: "q near 0 there"), and the same with 20% of its mass moved onto the target mode. The
tracked number is q's mass on the target mode (tokens 62..78) against gradient steps. Tajwar et al.
2024 (section 6) argue that the reverse KL relocates mass between bins faster, because it also pushes
mass DOWN where q exceeds p, while the forward KL only pulls up where p exceeds q; the reverse KL's
pull on bin i is proportional to q_i, so it starts slowly where q is near 0.

    python benchmarks/mode_seeking.py                       # table, and benchmarks/figures/claim8.png
    python benchmarks/mode_seeking.py --lr 5 --json out.json
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.bandit import pi_data  # noqa: E402

TARGET, OTHER, WIDTH, WINDOW = 70, 20, 4.0, (62, 78)


@dataclass
class Args:
    steps: int = 400
    """gradient steps on the logits"""
    lr: float = 1.0
    """step size of plain gradient descent"""
    figure: Optional[str] = "benchmarks/figures/claim8.png"
    """where to write the figure (None: no figure)"""
    json: Optional[str] = None
    """where to write the curves and the summary as JSON"""


def bump(center, width, k=100):
    b = np.exp(-0.5 * ((np.arange(k) - center) / width) ** 2)
    return b / b.sum()


def target_distribution():
    """p: 0.8 on a mode at token 70, 0.2 on a mode at token 20, floored at 1e-12 so log p is finite."""
    p = np.maximum(0.8 * bump(TARGET, WIDTH) + 0.2 * bump(OTHER, WIDTH), 1e-12)
    return p / p.sum()


def starts():
    """The two initial q: the bandit's pi_data (little mass at the target), and 20% of it moved there."""
    q = np.maximum(pi_data(), 1e-6)  # pi_data has empty bins; logits need q > 0
    q = q / q.sum()
    return {"pi_data (4% near the target)": q, "pi_data + 20% on the target": 0.8 * q + 0.2 * bump(TARGET, 2 * WIDTH)}


def descend(q0, p, divergence, lr, steps):
    """Exact gradient descent on q's logits; q's mass in WINDOW after each step, [steps + 1]."""
    theta = torch.tensor(np.log(q0), dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor(np.log(p))
    in_window = torch.zeros(len(p), dtype=torch.bool)
    in_window[WINDOW[0] : WINDOW[1] + 1] = True
    mass = []
    for step in range(steps + 1):
        log_q = torch.log_softmax(theta, 0)
        mass.append(log_q.exp()[in_window].sum().item())
        if step == steps:
            break
        if divergence == "forward":
            loss = (log_p.exp() * (log_p - log_q)).sum()  # KL(p || q)
        else:
            loss = (log_q.exp() * (log_q - log_p)).sum()  # KL(q || p)
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
    return np.array(mass)


def steps_to(curve, level):
    """First step at which the curve reaches `level` (None if never)."""
    hit = np.nonzero(curve >= level)[0]
    return int(hit[0]) if len(hit) else None


def run(args: Args):
    p = target_distribution()
    goal = 0.9 * p[WINDOW[0] : WINDOW[1] + 1].sum()
    result = {"p_target_mass": float(p[WINDOW[0] : WINDOW[1] + 1].sum()), "goal": float(goal), "lr": args.lr, "starts": {}}
    for name, q0 in starts().items():
        fwd, rev = descend(q0, p, "forward", args.lr, args.steps), descend(q0, p, "reverse", args.lr, args.steps)
        result["starts"][name] = {"forward": fwd.tolist(), "reverse": rev.tolist(), "steps_to_goal": {
            "forward": steps_to(fwd, goal), "reverse": steps_to(rev, goal)}}
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (name, r) in zip(axes, result["starts"].items()):
        ax.plot(r["forward"], label="forward KL(p || q): maximum likelihood", color="tab:blue")
        ax.plot(r["reverse"], label="reverse KL(q || p): mode-seeking", color="tab:red")
        ax.axhline(result["p_target_mass"], color="gray", ls=":", label="p's mass on the target mode")
        ax.set_title(f"start: {name}", fontsize=10)
        ax.set_xlabel("gradient steps on q's logits")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"q's mass on tokens {WINDOW[0]}..{WINDOW[1]}")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Claim 8: fitting a categorical q to a bimodal p by gradient descent (lr {result['lr']})", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args):
    result = run(args)
    marks = [m for m in (0, 10, 25, 50, 100, 200, 400) if m <= args.steps]
    print(f"q's mass on the target mode (tokens {WINDOW[0]}..{WINDOW[1]}; p has {result['p_target_mass']:.3f}) "
          f"after N steps, lr {args.lr}\n")
    print("| start | divergence | " + " | ".join(f"N={m}" for m in marks) + f" | steps to {result['goal']:.3f} |")
    print("|---|---|" + "---|" * (len(marks) + 1))
    for name, r in result["starts"].items():
        for kind in ("forward", "reverse"):
            print(f"| {name} | {kind} | " + " | ".join(f"{r[kind][m]:.3f}" for m in marks) + f" | {r['steps_to_goal'][kind]} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result))
    if args.figure:
        plot(result, args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(tyro.cli(Args))
