"""Does a script collapse at its defaults? Run it on many seeds and count, by the study's collapse rule.

    python benchmarks/stability.py --script online_dpo --task skew_length --seeds 1-10
    python benchmarks/stability.py --script dpo --task min_length --seeds 1-5 --workers 2 -- --learning-rate 1e-4
    CLEANPREF_WORLD_SEED=1 python benchmarks/stability.py --script ppo --task min_length   # another world (tasks/)

Each seed is one run of algos/<script>.py at its defaults (TASK_DEFAULTS: the tuned rate and knob, the full length), with
the flags after `--` added, as a subprocess with one torch thread (`--workers` at a time), in
`--out/<task>__<script>__<flags>__s<seed>/` (default --out: runs/stability); a seed whose directory holds done.json is
not run again. It prints, per seed, whether the run collapsed (and at which iteration), its worst normalised gold, its
final gold, its largest KL(pi || pi_ref) and its lowest EOS rate over the evaluations, then "k of n collapsed".

The collapse rule is benchmarks/study.py's (`collapse`, imported from it; the study's docstring states it): at an
evaluation after iteration 0, the normalised gold (gold - gold_0) / (best - gold_0) below -1, or, on a length task, the
EOS rate below 0.5. A collapse at the defaults means the default sits on a cliff: the study's tuning would not pick it.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402  (benchmarks/ scripts may import each other; the algos/ scripts may not)


@dataclass
class Args:
    script: str
    """the objective, algos/<script>.py (one that declares STUDY)"""
    task: str
    """the task (bandit_r1, bandit_r2, min_length, mode_length, skew_length)"""
    seeds: tuple[str, ...] = ("1-10",)
    """seeds: ranges and lists, e.g. 1-10, or 1 2 3, or 1-3,7"""
    workers: int = os.cpu_count() or 1
    """runs at a time (each uses one torch thread)"""
    out: Optional[str] = None
    """where the runs go (default runs/stability)"""


def seeds_of(tokens):
    """["1-3", "7", "9,10"] -> [1, 2, 3, 7, 9, 10]."""
    seeds = []
    for token in tokens:
        for part in str(token).split(","):
            if part:
                lo, _, hi = part.partition("-")
                seeds += list(range(int(lo), int(hi or lo) + 1))
    return list(dict.fromkeys(seeds))


def parse(argv):
    """(Args, the script's extra flags): what comes after `--` goes to the script."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return tyro.cli(Args, args=argv[:cut]), argv[cut + 1:]


def pairs(extra):
    """Script flags as the study's (flag, value) pairs: ["--learning-rate", "1e-4", "--offline"] -> (("learning-rate", "1e-4"), ("offline", ""))."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--"):
            raise SystemExit(f"after --: expected a --flag, got {flag!r}")
        if "=" in flag:
            out.append(tuple(flag[2:].split("=", 1)))
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append((flag[2:], extra[i + 1]))
            i += 2
        else:
            out.append((flag[2:], ""))
            i += 1
    return tuple(out)


def main(parsed):
    args, extra = parsed
    study.declaration(args.script)  # one clear line for a script that declares nothing
    if args.task not in study.TASKS:
        raise SystemExit(f"--task {args.task}: choose among {', '.join(study.TASKS)} (the collapse rule needs the task's best gold)")
    options = pairs(extra)
    runs = [study.Run(study.Arm(args.script, args.task, options), seed, options) for seed in seeds_of(args.seeds)]
    out = Path(args.out or "runs/stability")
    out.mkdir(parents=True, exist_ok=True)
    world = os.environ.get("CLEANPREF_WORLD_SEED", "0")
    study.prebuild([args.task], world)
    launcher = study.Launcher(out, args.workers, env={"CLEANPREF_WORLD_SEED": world})
    launcher.launch(runs)
    results = []
    print(f"\n{args.script} on {args.task} at its defaults{' with ' + ' '.join(extra) if extra else ''} (world {world}); under {out}/")
    print("| seed | collapsed | worst normalised gold | final gold | max KL | min EOS rate |\n|---|---|---|---|---|---|")
    for run in runs:
        if not launcher.done(run):
            print(f"| {run.seed} | FAILED: see {out / run.key / 'stderr.txt'} | | | | |")
            continue
        rows = study.read_rows(out / run.key)
        c = study.collapse(rows, args.task)
        evals = [r for r in rows if "eval/gold_reward" in r]
        r = {"seed": run.seed, **c, "final_gold": study.final(rows), "max_kl": max(e.get("eval/kl_ref", np.nan) for e in evals),
             "min_eos": min(e.get("eval/eos_rate", np.nan) for e in evals[1:] or evals)}
        results.append(r)
        print(f"| {run.seed} | {'yes, at iteration ' + str(c['collapse_iteration']) if c['collapsed'] else 'no'} | "
              f"{c['worst_normalised'] if c['worst_normalised'] is not None else float('nan'):.3f} | {r['final_gold']:.4g} | "
              f"{r['max_kl']:.4g} | {r['min_eos']:.3f} |")
    print(f"\n{sum(r['collapsed'] for r in results)} of {len(results)} collapsed"
          + (f" ({len(runs) - len(results)} failed)" if len(results) < len(runs) else ""))
    return results


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
