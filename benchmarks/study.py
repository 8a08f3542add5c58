"""The study in one command: the nine claims of docs/paper.md section 5, each measured in its own words, with figures.

    python benchmarks/study.py --tune              # first: rates, strengths, budgets -> benchmarks/tuning.json (hours)
    python benchmarks/study.py                     # all claims, seeds 1-5 on world 0, claims 1 2 3 5 on world 1 (seeds 1-3)
    python benchmarks/study.py --quick             # one seed, short runs, world 0: a smoke test of the whole pipeline
    python benchmarks/study.py --claims 1 3 --seeds 21 22 23 --out runs/my_study
    python benchmarks/study.py --dry-run           # what would run (runs, iterations, evaluations, estimated cost)
    python benchmarks/study.py --tune --dry-run    # the same for the tuning
    python benchmarks/stability.py --script online_dpo --task skew_length --seeds 1-10   # does a default collapse?

Runs are subprocesses (one torch thread each, `--workers` at a time), each in its own directory
`--out/<task>__<script>__<options>__s<seed>/` (world 1: `--out/world1/...`); a run whose directory holds `done.json`
is never run again, so a killed study or tuning resumes where it stopped, and claims share their runs (a run as long
as its longest use). Every `done.json` records whether the run collapsed (below).

The protocol (issue 27, protocol 2), fixed before the re-run that replaces the issue-19 result. What changed from
issue 19 and why: runs collapsed at tuned rates and one collapsed seed decided a 5-seed mean (a collapse rule, a
clipped area, tuning that never picks a collapsing rate); the tuning picked rates on a cliff (three seeds, the median,
grids extended without a cap, then refined); budgets were set by the single fastest arm (the median arm now); "best"
used unpaired intervals (paired differences now); report.json kept no per-seed values (it keeps them all now).

- The world. The embedded tasks are one draw of pi_ref, preference data and proxy reward model; tasks/ selects a
  draw by the environment variable CLEANPREF_WORLD_SEED (default 0, part of the cache key) and records
  `task.info["fingerprint"]` (pi_ref's length mode and EOS rate, the gold at iteration 0, a short hash of pi_ref's
  weights; the bandits alike). The study reads each world's fingerprints after building it (a subprocess with the
  world's variable set, as the runs get it) and prints them in report.md and report.json. World 0 is the main
  world: every claim, the reporting seeds. World 1 (`--world-seeds 0 1`, the default; `--quick` runs world 0 only)
  repeats claims 1, 2, 3 and 5 on seeds 1-3 (the first three reporting seeds) at world 0's tuned values and
  budgets (world 1 is never tuned on: it asks whether the conclusions carry over to another draw), in `--out/world1`;
  every check says whether its world-1 outcome agrees with world 0's (the same outcome). A world whose fingerprints
  are missing or equal to world 0's is refused: the study cannot tell it is another world.
- The methods. The objectives are the algos/*.py scripts that declare `STUDY` (responses per row of B, variants,
  knob; sft.py and reward_model.py declare none); a method is a script or a script with one of its variants
  (`best_of_n --offline`). The paper's 14 methods (pref_ft dpo ipo hypo best_of_n best_of_n_neg rwr online_dpo
  online_ipo reinforce ppo grpo, and best_of_n --offline, rwr --offline) set the budgets and make the nine claims'
  checks; every other declared method (simpo, orpo, kto, ...) is tuned the same way, joins claim 5's leaderboard
  of every task and the report's "Beyond the paper" section (its rank and area against its nearest sibling: simpo
  and kto against dpo, orpo against pref_ft), and never enters a check, so a new script cannot change a verdict.
- Responses are the budget's unit. `samples` counts responses generated or read; per iteration a script adds B
  times its declared responses per row (STUDY["responses_per_row"] on the script's Args with the run's options:
  2 per offline pair, 2 + k for HyPO, 1 per completion). C = 4 completions per prompt for every on-policy arm
  (passed explicitly); every iteration of every arm is 64 responses (B = 64 completions, 32 pairs, HyPO's 16 pairs
  and their 32 online samples; claim 7 varies B), so every arm is evaluated at the same responses. Full length:
  6,400 responses on the bandits, 3,840 on the length tasks (100 and 60 iterations).
- Evaluations: every iteration up to iteration 16, then every 5, and at the end (`--eval-dense-every 1
  --eval-dense-until 16 --eval-every 5`), on the task's first 128 held-out prompts, with a sampler seeded by the
  run's seed alone (at a seed every arm's iteration 0 is the same draw from pi_ref). Any budget (16 iterations or
  more) holds at least 17 evaluations; the study refuses a plan in which an arm it compares by area has fewer than
  12 inside its budget (claim 7 excepted, below). The scripts have one dense regime; issue 27 asked for every
  iteration to 16, every 2 to 30 and every 10 after; every 5 after 16 costs less than its fallback, every iteration
  to 30 then every 10 (26 evaluations in 60 iterations and 34 in 100, against 34 and 38; issue 19: 19 and 23), and
  sees a late collapse within 5 iterations.
- A run's curve: its gold reward against responses (or nominal gradient steps, B / M * T per iteration), linear
  between evaluations, normalised as (gold - gold_0) / (best - gold_0), gold_0 its iteration-0 gold (pi_ref), best
  1 on the bandits and 0 on the length tasks. Primary metric, the area: the mean over [0, budget] (trapezoid) of the
  normalised curve clipped below at -1 at every evaluation, so that one collapsed seed weighs at most as much as a
  run that lost the whole room once more (issue 19: a seed at -1.5 decided a 5-seed mean). Secondary: the gold at
  the budget; responses to 50% and 90% of the room (first crossing, censored at the budget). "Final" (claims 2, 4,
  9, full length): the mean of the last two evaluations (training statistics: of the last five iterations).
- Collapse. A run collapses when, at any evaluation after iteration 0, its normalised gold is below -1 (it lost
  more than the whole room above pi_ref) or, on a length task, its eval/eos_rate is below 0.5 (pi_ref ends 99% of
  its responses; below half, the policy has stopped ending them). Every run's done.json records `collapsed`,
  `collapse_iteration` (the first such evaluation) and `worst_normalised` (the lowest normalised gold after
  iteration 0); the report lists per arm and task how many seeds collapsed, and report.json each seed's flag. The
  same rule is benchmarks/stability.py's.
- Budgets, per task, from the tuning runs of the paper's 14 methods, each at its winning learning rate: each run's
  responses to 90% of the room, censored at the full length; for each method the median over the tuning seeds;
  the budget is twice the median of these over the 14 methods (the median method, not the fastest: issue 19's
  rule made min_length's and skew_length's budgets 4 iterations), rounded up to a whole iteration (64 responses),
  at least 16 iterations (1,024 responses) and at most the full length. Winners depend on the budget and the
  budget on the winners: per task the study iterates budget -> winners -> budget from the full length until a
  budget repeats (in a cycle: its largest). The budgets are fixed before the knob runs. Claim 7 (gradient steps):
  its arms are compared on the evaluations all four share, every 32 steps (one iteration of B = 512 at M = 16), and
  8 shared evaluations after iteration 0 need 256 steps (4,096 responses), the full length rounded up to a whole
  B = 512 iteration: its budget is 256 steps on both tasks. Its arms are evaluated every iteration at B >= 256 and
  every 2 below (B = 64, 128, 256, 512: 33, 17, 17 and 9 evaluations).
- Tuning (`--tune`, seeds 101 102 103, disjoint from the reporting seeds; full-length runs): every method on every
  task. A rate's score is the median over the tuning seeds of its areas over the task's budget; a rate at which any
  tuning seed collapses cannot win; the best score wins (scores within 1e-6 tie; the smaller rate wins a tie).
  Learning rates lie on the half-decade ladder (1e-4, 3e-4, 1e-3, ...); each grid starts at the script's current
  rate (TASK_DEFAULTS, or OFFLINE_LEARNING_RATES for --offline: the issue-19 winners) and its two neighbours
  (`--tune-start fixed`: {1e-4 .. 1e-2} on the bandits, {1e-5 .. 1e-3} on the length tasks). A winner at the edge
  of its grid (its smallest or largest rate) adds the next ladder rate beyond it, and budgets and winners are
  recomputed from every run so far, round after round, until every winner is interior or at the ladder's limits
  1e-6 and 1e-1 (a grid whose every rate collapses extends downwards the same way; one that reaches 1e-6 still
  collapsing keeps its smallest rate, flagged `"stable": false`). Then one refinement: x2 and /2 of each winner
  (within the limits) join the grid and the winner is re-picked, never a collapsing rate; where that moves a winner
  to an end of its grid (a third seed can), the grid is extended and refined again the same way. `--tune-rounds N` is an
  emergency cap only: a grid it stops is flagged `"capped": true` and its edge winner `"edge": true`. In
  tuning.json `edge` means "could have been extended and was not": false for every winner of a finished tuning;
  `at_limit` marks a winner at a ladder limit. Rates are swept at each script's untuned knob (STUDY["knob"],
  passed explicitly); then, at the winning rate (coordinate-wise: the rate is not re-tuned), the knob of each
  script that declares one (ppo init_kl_coef 0.02, grpo beta 0.04, hypo kl_coef 0.03, best_of_n_neg beta 0.1) on
  the half-decade ladder around its untuned value (0.02: 0.0063, 0.02, 0.063, two significant digits), extended the
  same way until interior or at the limits 1e-4 and 10, then refined at x2 and /2, over the fixed budgets (a tie
  keeps the untuned value). Three economies that cannot change a winner: seeds are queued in the order 101, 102, 103
  and a later seed of a value is not started once an earlier one has collapsed; a tuning run is stopped at its first collapsing
  evaluation; and the third seed runs only where it can change the winner: a rate whose two seeds did not collapse
  gets seed 103 when the larger of its two areas (the most its median of three can be) reaches the best score of
  the grid's complete rates (three seeds, none collapsed) less 1e-6, or, in a grid with no complete rate yet, when
  its smaller area is the grid's largest; repeated until no rate qualifies at the current budgets. tuning.json
  keeps every rate's per-seed areas and collapses (null for a seed not run, or collapsed). A tuning outlasts a sitting: a
  complete one appends each finished run to benchmarks/tuning_runs.jsonl (the Ledger, committed) and restores them first,
  so it continues on another machine if that machine builds the same world (the ledger's fingerprints; else it refuses)
  and the code that made a record is unchanged (else that run is run again);
  `wall_s` is the last sitting's, `runs_s` every run's. It writes
  benchmarks/tuning.json (protocol 2) and prints the TASK_DEFAULTS rows it implies; the study passes each arm its
  tuned rate and knob from that file explicitly. A partial tuning (`--tune-scripts`, say a new script) writes
  OUT/tune/tuning.json only, at the budgets of an existing protocol-2 --tuning file if there is one (else by the rule,
  over the paper's methods among those it tunes, or all of them); `--tune-merge` adds its methods to that file.
- Verdicts. Reporting seeds 1-5. Each check is a difference paired by seed, signed so that the claim predicts it
  positive, and its 90% percentile bootstrap interval of the mean over seeds (10,000 resamples, generator seed
  0): the check holds when the interval lies above 0, fails when it lies below 0, and is inconclusive otherwise.
  A claim HOLDS when every check holds, DOES NOT HOLD when any fails, and is INCONCLUSIVE otherwise. "X is best or
  fastest" (claim 5), X the better (by mean area) of online DPO and online IPO, compared with each other method of
  the paper's 14 by the paired difference (other - X): it holds when no other method's difference has an interval
  above 0 and at least one has an interval below 0, fails when some method's interval lies above 0, and is
  inconclusive otherwise; the check reports X minus the best other method (by mean). The leaderboard (rank, mean
  area and its interval, every method) is descriptive: equal means share a rank.
- Under every check that fails or is inconclusive, report.md prints two or three lines generated from the per-seed
  data: which arms collapsed on which seeds (iteration, EOS rate, worst normalised gold) and the difference over the
  seeds where no arm of the check collapsed; each arm's gold, KL(pi || pi_ref), EOS rate and response length at the
  budget (logps/chosen where the script logs it); whether each arm's tuned rate and knob are interior in their
  grids. A check that fails with every arm interior in its grids and no arm collapsed on any seed is labelled
  "disagrees with the paper"; a figure shows the per-seed curves of the arms of every such check
  (claim<N>_checks.png).
- report.json (protocol 2) holds every arm on every task it ran, per world: per seed its area, gold at the budget,
  final gold, final KL (eval/kl_ref), collapse; the mean and 90% interval of its area; each check's per-seed
  differences (and world 1's, with the agreement); the budgets and the fingerprints. `validate_report` checks that
  schema (and the issue-19 report, protocol 1, against its own). After writing it, a complete study (not --quick)
  renders each objective's results (`objective_results`) into docs/objectives/<script>.md between the lines
  `<!-- results: generated by benchmarks/study.py -->` and `<!-- /results -->`, with its gold curves on the five
  tasks in benchmarks/figures/objectives/<script>.png.
- Each check quotes the words of docs/paper.md section 5 it tests. Speed and "beats" claims (1, 2, 3, 5, 6) compare
  areas against responses, claim 7 against gradient steps; claims 4 and 9 compare full-length finals, and claim 2
  reports its full-length finals too. Claim 8 is the deterministic toy: one value, no interval. The checks:
  1. bandit_r1 and min_length: online_dpo > dpo, best_of_n > best_of_n --offline ("beat"); each gap larger there
     than on bandit_r2 / mode_length ("the gap shrinks or vanishes").
  2. skew_length: online_dpo > dpo, online_ipo > ipo, best_of_n > best_of_n --offline ("helps"); each gap larger
     than on min_length, the same reward with well-covering data ("most clearly under poor coverage").
  3. bandit_r1 and min_length: dpo and ipo each > pref_ft, best_of_n --offline, rwr --offline; best_of_n_neg >
     best_of_n.
  4. bandit_r1 and min_length: dpo's rewards/margins grows more than pref_ft's (full-length final minus the first
     iteration); whether log pi(y_w) fell is reported ("may": no check).
  5. every task: the better of online_dpo / online_ipo is best or fastest among the paper's 14 methods (above);
     online_dpo > dpo and online_dpo > best_of_n ("Complementary").
  6. bandit_r1, T in {1, 2, 4, 8}: T = 2 > T = 1 for online_dpo, best_of_n, ppo ("a little helps"); T = 8 < T = 2
     for online_dpo and best_of_n ("much hurts non-RL methods"); ppo's loss from T = 2 to T = 8 smaller than each
     of theirs ("PPO tolerates it best").
  7. online_dpo, B in {64, 128, 256, 512} at M = 16: B = 64 > B = 512 on min_length ("more reward per gradient
     step"); that gap larger than on mode_length ("little difference on Mode Length").
  8. from a start with mass on the target, reverse KL reaches 90% of p's target mass in fewer steps ("much
     faster"); from pi_data it holds less mass than forward KL after 25 steps ("starts slowly").
  9. min_length and skew_length: hypo's KL below half of dpo's ("far below"); hypo's gold not below dpo's by more
     than 5% of the room ("at equal or better reward").
"""

import concurrent.futures
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["bandit_r1", "bandit_r2", "min_length", "mode_length", "skew_length"]
BANDITS = ("bandit_r1", "bandit_r2")
LENGTH_TASKS = ("min_length", "mode_length", "skew_length")
BATCH = 64  # responses per iteration of every arm (claim 7 varies it)
FULL = {t: 100 * BATCH if t in BANDITS else 60 * BATCH for t in TASKS}  # the full length, in responses
BEST = {t: 1.0 if t in BANDITS else 0.0 for t in TASKS}  # the highest gold reward a policy can reach
EVAL_SCHEDULE = {"eval-every": "5", "eval-dense-every": "1", "eval-dense-until": "16"}  # every iteration to 16, then every 5
MIN_EVALUATIONS = 12  # inside its budget, for every arm compared by area (claim 7's arms: SHARED7 shared ones)
COMPLETIONS = "4"  # C of every on-policy arm
SIZES7, MINIBATCH7 = [64, 128, 256, 512], 16  # claim 7: B at fixed M (every script's default M)
STEP_ROUND = max(SIZES7) // MINIBATCH7  # one iteration of claim 7's largest B: 32 gradient steps, its shared evaluations
SHARED7 = 8  # claim 7 compares its arms on at least this many shared evaluations after iteration 0
FULL_STEPS = {t: math.ceil(FULL[t] / MINIBATCH7 / STEP_ROUND) * STEP_ROUND for t in TASKS}  # 416 and 256
STEPS_BUDGET = {t: min(FULL_STEPS[t], SHARED7 * STEP_ROUND) for t in TASKS}  # claim 7's budget: 256 gradient steps
PAPER = ["pref_ft", "dpo", "ipo", "hypo", "best_of_n", "best_of_n_neg", "rwr", "online_dpo", "online_ipo", "reinforce", "ppo", "grpo"]
PAPER_METHODS = PAPER[:5] + ["best_of_n --offline"] + PAPER[5:7] + ["rwr --offline"] + PAPER[7:]  # the paper's 14 methods
SIBLINGS = {"simpo": "dpo", "kto": "dpo", "orpo": "pref_ft"}  # "Beyond the paper": each new script against its nearest paper method
LADDER = [float(f"{m}e{e}") for e in range(-8, 1) for m in (1, 3)]  # the half-decade learning-rate ladder
LR_START = {t: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] if t in BANDITS else [1e-5, 3e-5, 1e-4, 3e-4, 1e-3] for t in TASKS}  # --tune-start fixed
LR_LIMITS = (1e-6, 1e-1)
KNOB_LIMITS = (1e-4, 10.0)
TIE = 1e-6  # scores this close tie
COLLAPSE_BELOW, EOS_BELOW, CLIP_BELOW = -1.0, 0.5, -1.0  # the collapse rule and the area's floor (normalised gold; EOS rate)
BUDGET_FLOOR = 16 * BATCH  # 16 iterations, 1,024 responses
WORLD_CLAIMS, WORLD_SEEDS = (1, 2, 3, 5), 3  # what a second world repeats, on this many of the reporting seeds
TUNING = ROOT / "benchmarks" / "tuning.json"
LEDGER = ROOT / "benchmarks" / "tuning_runs.jsonl"  # a complete tuning's finished runs (Ledger)
PAGE_START, PAGE_END = "<!-- results: generated by benchmarks/study.py -->", "<!-- /results -->"
# the dry run's cost model, seconds on one idle core: start (imports, task), per iteration of 64 responses, per evaluation.
# Calibrated on the issue-19 tuning (690 runs, 15,075 s measured; the model gives 14,949 s); it gives 5,451 s for the
# issue-19 study, measured 6,156 s: read its estimates as +-15%. Runs start from a fork server since (start_script): a
# 4-iteration run took 1.8 s against 7.7 s (bandit_r1) and 6.7 s against 14.6 s (min_length) in a new interpreter, so
# the starts (4.5, 8.0) were scaled by the measured ratios of start time (0.19, 0.33).
COST = {"bandit": (0.9, 0.05, 0.05), "length": (2.7, 0.25, 0.35)}


@dataclass
class Args:
    claims: list[int] = field(default_factory=lambda: list(range(1, 10)))
    """claims to run (1-9, docs/paper.md section 5)"""
    seeds: Optional[list[int]] = None
    """reporting seeds (default 1 2 3 4 5; 1 with --quick), e.g. --seeds 21 22 23"""
    world_seeds: Optional[list[int]] = None
    """worlds (CLEANPREF_WORLD_SEED; default 0 1, 0 with --quick): the first runs every claim, each other claims 1 2 3 5 on the
    first three seeds, at the first world's tuning and budgets"""
    quick: bool = False
    """one seed, full length halved, budgets a quarter of the full length unless --tuning exists: a smoke run"""
    out: Optional[str] = None
    """where runs and the report go (default runs/study, or runs/study_quick with --quick)"""
    figures: Optional[str] = None
    """where the figures (and a copy of report.md, report.json) go (default benchmarks/figures, or OUT/figures with --quick)"""
    pages: Optional[str] = None
    """the docs folder whose objectives/<script>.md pages get the results (default: docs/, only for a complete study that
    writes benchmarks/figures)"""
    workers: int = os.cpu_count() or 1
    """runs at a time (each uses one torch thread)"""
    max_iterations: Optional[int] = None
    """cap every run at this many iterations (for testing the pipeline)"""
    dry_run: bool = False
    """print what would run (runs, iterations, evaluations per script, the estimated cost) and stop"""
    tuning: str = str(TUNING)
    """the tuning result: budgets, rates and knobs the study uses (--tune writes it)"""
    tune: bool = False
    """instead of the claims: tune rates (and knobs) on --tuning-seeds, derive the budgets, write --tuning"""
    tuning_seeds: list[int] = field(default_factory=lambda: [101, 102, 103])
    """seeds of the tuning runs (disjoint from the reporting seeds)"""
    tune_scripts: list[str] = field(default_factory=list)
    """scripts to tune (default: every objective, i.e. every algos/ script that declares STUDY; a subset writes OUT/tune only)"""
    tune_tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to tune on"""
    tune_rates: list[float] = field(default_factory=list)
    """the starting grid of learning rates (default: by --tune-start)"""
    tune_start: Literal["defaults", "fixed"] = "defaults"
    """start each grid at the script's current rate and its two ladder neighbours (defaults), or at LR_START (fixed)"""
    tune_around_defaults: bool = False
    """issue 19's flag for --tune-start defaults, now the default (kept so its command still runs)"""
    tune_limits: tuple[float, float] = LR_LIMITS
    """learning-rate grids are never extended beyond these rates"""
    tune_knob_limits: tuple[float, float] = KNOB_LIMITS
    """knob grids are never extended beyond these values"""
    tune_rounds: Optional[int] = None
    """an emergency cap on the rounds of grid extension (default: none, until every winner is interior or at a limit); a grid
    it stops is flagged `"capped": true` and its edge winner `"edge": true` in --tuning"""
    tune_merge: bool = False
    """a partial tuning (--tune-scripts) also adds its methods to --tuning (a protocol-2 file, whose budgets it used)"""
    tune_ledger: Optional[str] = None
    """the ledger of finished tuning runs that --tune restores and appends to (default: benchmarks/tuning_runs.jsonl for a
    complete tuning, none for a partial one)"""


# -------------------------------------------------------------------------------------- the scripts
def load_script(script, folder="algos"):
    """Import {folder}/{script}.py as a module (registered under a private name, so tyro can read its docstrings)."""
    name = f"_cleanpref_{folder}_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def objective_scripts():
    """The algos/*.py scripts that declare STUDY, the paper's twelve first (in their order), then the others by name."""
    found = {p.stem for p in (ROOT / "algos").glob("*.py") if re.search(r"^STUDY\s*=", p.read_text(), re.M)}
    return [s for s in PAPER if s in found] + sorted(found - set(PAPER))


def declaration(script):
    """The script's STUDY: responses_per_row(args), variants, knob (None or (Args field, untuned value)); one line if none."""
    if not (ROOT / "algos" / f"{script}.py").exists():
        raise SystemExit(f"no such script algos/{script}.py; the objectives are {', '.join(objective_scripts())}")
    study = getattr(load_script(script), "STUDY", None)
    if study is None:
        raise SystemExit(f"algos/{script}.py declares no STUDY (responses_per_row, variants, knob; see algos/dpo.py): the study runs "
                         f"only the objectives that do: {', '.join(objective_scripts())}")
    return study


def methods_of(scripts):
    """Each script and each of its declared variants: ["best_of_n", "best_of_n --offline", ...]."""
    return [" ".join([s] + [f"--{v}" for v in vs]) for s in scripts for vs in [[]] + [[v] for v in declaration(s)["variants"]]]


def knob_of(script):
    """(Args field, untuned value) of the strength the tuning sweeps beside the rate, or None."""
    knob = declaration(script)["knob"]
    return None if knob is None else (knob[0], float(knob[1]))


def flags(options: dict):
    return tuple(s for k, v in options.items() for s in ([f"--{k}"] + ([v] if v != "" else [])))


@functools.lru_cache(maxsize=None)
def parsed_args(script, argv: tuple = ()):
    """The script's Args with `argv` applied (tyro, as the script parses it); TASK_DEFAULTS are not applied."""
    try:
        return tyro.cli(load_script(script).Args, args=list(argv))
    except SystemExit:
        raise SystemExit(f"algos/{script}.py does not take {' '.join(argv)}") from None


def script_args(script):
    """The script's Args() with every default."""
    return parsed_args(script, ())


def option(script, options: dict, name):
    """The value of --name among `options` (flag -> value strings), else the script's default."""
    return options.get(name.replace("_", "-"), getattr(script_args(script), name))


def responses_per_iteration(script, options: dict):
    """What `samples` grows by each iteration: B times the script's declared responses per row, on its Args with `options`."""
    args = parsed_args(script, flags(options))
    return int(args.batch_size) * int(declaration(script)["responses_per_row"](args))


def steps_per_iteration(script, options: dict):
    """Nominal gradient steps per iteration: B / M minibatches, T passes."""
    return int(option(script, options, "batch_size")) // int(option(script, options, "minibatch_size")) * int(
        option(script, options, "update_epochs"))


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Arm:
    """One configuration: a script on a task with options (a tuple of (flag, value) pairs; value "" for a switch)."""

    script: str
    task: str
    options: tuple = ()
    label: str = ""

    @property
    def name(self):
        return self.label or " ".join([self.script] + [f"--{k}" + (f" {v}" if v != "" else "") for k, v in self.options])


def arm(script, task, label="", **options):
    """Arm(script, task) with options written as keyword arguments: update_epochs=4 -> --update-epochs 4, offline=True -> --offline."""
    opts = tuple((k.replace("_", "-"), "" if v is True else str(v)) for k, v in options.items())
    return Arm(script, task, opts, label)


def arm_of(name, task):
    """The arm of a method written as on the command line: "best_of_n --offline" -> arm("best_of_n", task, offline=True)."""
    script, *switches = name.split()
    return arm(script, task, **{f.lstrip("-").replace("-", "_"): True for f in switches})


@dataclass(frozen=True)
class Run:
    """An arm at one seed, with every option the study passes (its length, schedule, C, tuned values, then the arm's own)."""

    arm: Arm
    seed: int
    options: tuple

    @property
    def key(self):
        slug = "_".join(k + (f"={v}" if v != "" else "") for k, v in sorted(self.options)) or "default"
        return f"{self.arm.task}__{self.arm.script}__{slug}__s{self.seed}"

    @property
    def base(self):
        """The key without the length: runs with the same base differ only in how long they go on."""
        return Run(self.arm, self.seed, tuple((k, v) for k, v in self.options if k != "num-iterations")).key

    @property
    def iterations(self):
        return int(dict(self.options).get("num-iterations", 0))

    def command(self):
        if self.arm.script == "mode_seeking":  # claim 8's toy: its own small script, no task
            return [sys.executable, str(ROOT / "benchmarks" / "mode_seeking.py"), "--json", "result.json", "--figure", "None"]
        return [sys.executable, str(ROOT / "algos" / f"{self.arm.script}.py"), "--task", self.arm.task, "--seed", str(self.seed),
                *flags(dict(self.options))]


def make_run(a: Arm, seed, length, unit="samples", tuned=(), max_iterations=None):
    """`a` at `seed`, long enough for `length` responses (unit "samples") or gradient steps ("steps"): the study's
    options (schedule, C), the tuned ones, the arm's own, and a B that makes every iteration 64 responses (32 pairs;
    HyPO 16 pairs and their 32 online samples), so that every arm is evaluated at the same responses; --max-iterations
    caps it."""
    if a.script == "mode_seeking":
        return Run(a, 1, ())
    opts = dict(EVAL_SCHEDULE)
    if hasattr(script_args(a.script), "num_completions"):
        opts["num-completions"] = COMPLETIONS
    opts |= dict(tuned) | dict(a.options)
    if "batch-size" not in opts:
        per_unit = responses_per_iteration(a.script, opts | {"batch-size": "1"})
        opts["batch-size"] = str(BATCH // per_unit)
        if BATCH % per_unit or BATCH // per_unit % int(option(a.script, opts, "minibatch_size")):
            raise SystemExit(f"{a.name}: {BATCH} responses per iteration are not whole minibatches of {per_unit}-response units")
    per = (responses_per_iteration if unit == "samples" else steps_per_iteration)(a.script, opts)
    iterations = math.ceil(length / per)
    opts["num-iterations"] = str(min(iterations, max_iterations) if max_iterations else iterations)
    return Run(a, seed, tuple(opts.items()))


def evaluation_iterations(run):
    """The iterations at which a run evaluates (the scripts' rule: dense every D up to U, then every E, and the last)."""
    o, n = dict(run.options), run.iterations
    dense_every, dense_until, every = int(o.get("eval-dense-every", 2)), int(o.get("eval-dense-until", 0)), int(o.get("eval-every", 10))
    return [i for i in range(n + 1) if i % (dense_every if i <= dense_until else every) == 0 or i == n]


def longest(runs):
    """Each run -> the longest run with its base: a shorter use reads the start of the longer run's curve."""
    best = {}
    for r in runs:
        if r.base not in best or r.iterations > best[r.base].iterations:
            best[r.base] = r
    return {r: best[r.base] for r in runs}


def script_exists(script):
    return (ROOT / "benchmarks" / "mode_seeking.py").exists() if script == "mode_seeking" else (ROOT / "algos" / f"{script}.py").exists()


def read_rows(run_dir: Path):
    """The metrics rows of a run (the newest run directory the script wrote; a line still being written is skipped), or the
    toy's JSON; None where there are none."""
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    files = sorted((run_dir / "runs").glob("*/metrics.jsonl"))
    if not files:
        return None
    rows = []
    for line in open(files[-1]):
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def collapse(rows, task):
    """The protocol's collapse rule on a run's rows: {collapsed, collapse_iteration, worst_normalised}. A run collapses
    when, at an evaluation after iteration 0, its normalised gold is below -1 or, on a length task, its EOS rate below 0.5."""
    evals = [r for r in rows or [] if "eval/gold_reward" in r]
    if not evals or task not in BEST or evals[0]["eval/gold_reward"] == BEST[task]:  # no room above pi_ref: nothing to normalise
        return {"collapsed": False, "collapse_iteration": None, "worst_normalised": None}
    g0 = evals[0]["eval/gold_reward"]
    first, worst = None, None
    for r in evals[1:]:
        z = (r["eval/gold_reward"] - g0) / (BEST[task] - g0)
        worst = z if worst is None else min(worst, z)
        if first is None and (z < COLLAPSE_BELOW or task in LENGTH_TASKS and r.get("eval/eos_rate", 1.0) < EOS_BELOW):
            first = r["iteration"]
    return {"collapsed": first is not None, "collapse_iteration": first, "worst_normalised": worst}


def write_atomically(path: Path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # every run's
PRELOAD = ["numpy", "torch", "torch.nn.functional", "tyro", "safetensors.torch", "tokenizers", "tqdm.auto", "transformers",
           "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"]  # what every script imports
CHILD = """
import atexit, os, runpy, sys
os.chdir(cwd)
os.environ.update(env)
for fd, path in ((1, "stdout.txt"), (2, "stderr.txt")):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
try:
    runpy.run_path(argv[0], run_name="__main__")
finally:
    atexit._run_exitfuncs()
"""  # run in a child of the fork server: `python argv...`, in cwd, with env added, its output in stdout.txt and stderr.txt there


def start_script(command, cwd, env):
    """Start `command` (python SCRIPT ARGS) as a child of a fork server that has imported torch and transformers once, so a
    run skips the ~6 s of imports a new interpreter pays (a tuning makes ~1,500 runs). Its output goes to cwd/stdout.txt
    and cwd/stderr.txt. The child runs the script as
    `python SCRIPT ARGS` would (its own module namespace, sys.argv, cwd; tasks/ and common.py imported afresh: nothing of
    a run is shared) with RUN_ENV and `env`; tests/test_study.py checks its metrics equal a new interpreter's. Returns
    the multiprocessing.Process (exitcode, join, terminate)."""
    import multiprocessing
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    with _LOCK:
        if not getattr(start_script, "started", False):  # the server inherits this environment: one torch thread, offline
            saved = dict(os.environ)
            os.environ.update(RUN_ENV)
            ctx.set_forkserver_preload(PRELOAD)
            multiprocessing.forkserver.ensure_running()
            os.environ.clear()
            os.environ.update(saved)
            start_script.started = True
    proc = ctx.Process(target=exec, args=(CHILD, {"argv": command[1:], "cwd": str(cwd), "env": {**RUN_ENV, **env}}))
    proc.start()
    return proc


_LOCK = threading.Lock()


class Launcher:
    """Runs what is not done yet, `workers` at a time, with a progress bar; results are read back from disk. `env` is
    added to each run's environment (the world); `stop_on_collapse` stops a run at its first collapsing evaluation (the
    tuning: such a rate cannot win); `skip(run)` is asked just before a run starts (the tuning: an earlier seed collapsed)."""

    def __init__(self, out: Path, workers: int, env: Optional[dict] = None, stop_on_collapse=False, skip: Optional[Callable] = None,
                 finished: Optional[Callable] = None):
        self.out, self.workers, self.failed = out, workers, {}
        self.env, self.stop_on_collapse, self.skip = env or {}, stop_on_collapse, skip or (lambda run: False)
        self.finished = finished or (lambda run: None)  # called with each run that finishes (the tuning's ledger)

    def done(self, run):
        return (self.out / run.key / "done.json").exists()

    def status(self, run):
        """The run's done.json (None if not done), its collapse fields computed from its rows where an older run lacks them."""
        if not self.done(run):
            return None
        status = json.loads((self.out / run.key / "done.json").read_text())
        if "collapsed" not in status and run.arm.script != "mode_seeking":
            status |= collapse(read_rows(self.out / run.key), run.arm.task)
        return status

    def launch(self, runs):
        from tqdm.auto import tqdm

        todo = [r for r in dict.fromkeys(runs) if script_exists(r.arm.script) and not self.done(r) and not self.skip(r)]
        if not todo:
            return
        print(f"{len(todo)} runs to do, {self.workers} at a time ({len(set(runs)) - len(todo)} done, skipped or missing)", flush=True)
        plain, started, shown = not sys.stderr.isatty(), time.time(), 0.0  # in a log file a bar's carriage returns make one line
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, tqdm(total=len(todo), desc="runs", unit="run", disable=plain) as bar:
            futures = {pool.submit(self.execute, r): r for r in todo}
            for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
                bar.update(1)
                if plain and (time.time() - shown >= 60 or n == len(todo)):  # there, a plain line a minute instead
                    shown = time.time()
                    print(f"runs: {n}/{len(todo)} in {shown - started:.0f} s", file=sys.stderr, flush=True)
                if future.result():
                    self.failed[futures[future].key] = future.result()
                    bar.write(f"FAILED {futures[future].key}:\n{future.result()}")
                elif self.done(futures[future]):  # not skipped
                    self.finished(futures[future])

    def execute(self, run):
        """Run one configuration from scratch in its directory; None on success (or skipped), else the error text."""
        if self.skip(run):  # asked again: an earlier seed may have collapsed while this one waited
            return None
        d = self.out / run.key
        shutil.rmtree(d, ignore_errors=True)  # a killed run left a partial directory: start it over
        try:
            d.mkdir(parents=True)
            start, stopped = time.time(), None
            proc = start_script(run.command(), d, self.env)
            while self.stop_on_collapse and proc.exitcode is None:
                proc.join(1.0)
                c = collapse(read_rows(d), run.arm.task)
                if c["collapsed"]:
                    proc.terminate()  # our own child, by its handle
                    stopped = c["collapse_iteration"]
                    break
            proc.join()
            code = proc.exitcode
            if code != 0 and stopped is None:
                tail = (d / "stderr.txt").read_text().strip().splitlines()[-8:]
                return f"  exit {code}: " + " ".join(run.command()[1:]) + "\n  " + "\n  ".join(tail)
            status = {"wall_s": round(time.time() - start, 1), "command": run.command()[1:], **self.env}
            if run.arm.script != "mode_seeking":
                status |= collapse(read_rows(d), run.arm.task) | ({"stopped_at": stopped} if stopped is not None else {})
            write_atomically(d / "done.json", json.dumps(status))  # other threads read it (the tuning's skip): never half written
        except OSError as err:
            return f"  cannot write under {d}: {err} (disk full?). Finished runs are kept; rerun the same command to resume."
        return None

    def wall(self, runs):
        """Seconds the finished runs took, one after another."""
        return sum(json.loads((self.out / r.key / "done.json").read_text()).get("wall_s", 0.0) for r in set(runs) if self.done(r))


class Ledger:
    """A tuning's finished runs, one JSON line each (its done.json and its evaluation rows: all the tuning reads of it), so
    that a tuning longer than one sitting (hours at 2 workers) continues in another, on another machine: `--tune` restores
    every run the ledger holds into OUT/tune before it starts and appends each run it finishes; a complete tuning keeps
    benchmarks/tuning_runs.jsonl, committed beside tuning.json. Its first line holds the world's fingerprints: a ledger
    written in another world (another CLEANPREF_WORLD_SEED, or a machine whose build differs) is refused, never mixed."""

    KEEP = ("iteration", "samples", "eval/gold_reward", "eval/eos_rate", "eval/kl_ref")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def code(script):
        """A short hash of what a run's numbers depend on besides its options: its script, common.py and tasks/. A record
        made by other code is not restored (its run is run again)."""
        files = [ROOT / "algos" / f"{script}.py", ROOT / "common.py", *sorted((ROOT / "tasks").glob("*.py"))]
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]

    def __init__(self, path: Path, fingerprints: dict):
        self.path, self.lock = Path(path), threading.Lock()
        if not self.path.exists():
            write_atomically(self.path, json.dumps({"fingerprints": fingerprints}) + "\n")
        with open(self.path) as f:
            theirs = json.loads(f.readline()).get("fingerprints")
        if theirs != json.loads(json.dumps(fingerprints)):
            raise SystemExit(f"{self.path}: its runs come from another world ({theirs}) than this machine builds ({fingerprints}); "
                             f"move it away to tune from scratch, or pass --tune-ledger NEW.jsonl")
        text = self.path.read_text()
        if not text.endswith("\n"):  # a line cut short when a sitting was killed: dropped (that run is run again)
            write_atomically(self.path, text[: text.rfind("\n") + 1])

    def restore(self, out: Path) -> int:
        """Write each of its runs that OUT lacks back as a finished run directory; returns how many."""
        restored = 0
        for line in self.path.read_text().splitlines()[1:]:
            record = json.loads(line)
            d = out / record["key"]
            if (d / "done.json").exists() or record.get("code") != self.code(record["script"]):
                continue
            shutil.rmtree(d, ignore_errors=True)
            (d / "runs" / "ledger").mkdir(parents=True)
            (d / "runs" / "ledger" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in record["rows"]))
            write_atomically(d / "done.json", json.dumps(record["done"]))
            restored += 1
        return restored

    def add(self, out: Path, run):
        rows = [{k: r[k] for k in self.KEEP if k in r} for r in read_rows(out / run.key) or [] if "eval/gold_reward" in r]
        line = json.dumps({"key": run.key, "script": run.arm.script, "code": self.code(run.arm.script),
                           "done": json.loads((out / run.key / "done.json").read_text()), "rows": rows}) + "\n"
        with self.lock, open(self.path, "a") as f:
            f.write(line)


# ------------------------------------------------------------------------------------------- metrics
def curve(rows, key="eval/gold_reward", scale=1.0):
    """(x, y) arrays of the rows that hold `key`: x the responses so far (times `scale`: gradient steps per response)."""
    points = [(r["samples"] * scale, r[key]) for r in rows if key in r]
    return np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)


def normalised(rows, best, scale=1.0):
    """The gold curve as a share of the room above pi_ref: (gold - gold_0) / (best - gold_0)."""
    x, y = curve(rows, scale=scale)
    return x, (y - y[0]) / (best - y[0])


def on_grid(x, y, step):
    """The points of a curve at multiples of `step` (claim 7 compares its arms on the grid they all share)."""
    keep = np.isclose(x / step, np.round(x / step))
    return x[keep], y[keep]


def area(x, y, budget, floor=CLIP_BELOW):
    """The mean over [0, budget] (trapezoid) of the piecewise-linear curve (x, y), clipped below at `floor` at every
    point (the protocol: -1, a collapsed seed weighs at most one room below pi_ref). Only a run capped by
    --max-iterations (a pipeline test) or stopped at its collapse (the tuning) ends before its budget: its last value
    is then held."""
    y = np.maximum(y, floor) if floor is not None else y
    if x[-1] < budget:
        x, y = np.append(x, budget), np.append(y, y[-1])
    keep = x < budget
    xs, ys = np.append(x[keep], budget), np.append(y[keep], np.interp(budget, x, y))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / budget)


def reach(x, y, level):
    """The first x at which the piecewise-linear curve reaches `level` (inf if it never does)."""
    above = np.nonzero(y >= level)[0]
    if not len(above):
        return math.inf
    i = above[0]
    return float(x[0]) if i == 0 else float(x[i - 1] + (level - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))


def final(rows, key="eval/gold_reward"):
    """Mean of the last two evaluations of `key` (of the last five training rows for training statistics)."""
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values[-2:] if key.startswith("eval/") else values[-5:]))


def budget_rule(reaches: dict, unit, full, floor=BUDGET_FLOOR):
    """The budget from {method: [its runs' reach of 90%, one per tuning seed]} (each at its winning rate): each reach
    censored at `full`, the median over seeds per method, twice the median over methods, rounded up to a whole `unit`,
    at least `floor`, at most `full`. Returns (budget, the median over methods, {method: its median})."""
    medians = {m: float(np.median(np.minimum(v, full))) if len(v) else float(full) for m, v in reaches.items()}
    if not medians:
        return full, float(full), {}
    middle = float(np.median(list(medians.values())))
    return min(full, max(floor, math.ceil(2 * middle / unit) * unit)), middle, medians


def fixed_point(budget_given, start):
    """Iterate b -> budget_given(b) from `start` until a budget repeats; a cycle gives its largest. Returns (budget, trace)."""
    trace = [start]
    while True:
        b = budget_given(trace[-1])
        if b in trace:
            return max(trace[trace.index(b):]), trace + [b]
        trace.append(b)


def bootstrap(values, resamples=10_000, seed=0, level=0.9):
    """(mean, [lo, hi]): the percentile bootstrap interval of the mean of `values` (one per seed)."""
    v = np.asarray(values, float)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), [float(lo), float(hi)]


def outcome(ci):
    return "holds" if ci[0] > 0 else "fails" if ci[1] < 0 else "inconclusive"


def verdict(outcomes):
    return "HOLDS" if all(o == "holds" for o in outcomes) else "DOES NOT HOLD" if "fails" in outcomes else "INCONCLUSIVE"


def ranking(values: dict):
    """Arms ranked by mean, best first: [{name, mean, ci90, rank}] (descriptive: the checks use paired differences).
    Equal means share a rank."""
    stats = {n: bootstrap(v) for n, v in values.items()}
    order = sorted(values, key=lambda n: -stats[n][0])
    return [{"name": n, "mean": stats[n][0], "ci90": stats[n][1], "rank": 1 + sum(stats[m][0] > stats[n][0] for m in values)}
            for n in order]


@dataclass
class Check:
    """One prediction: a difference per seed, positive where the claim says so; `ranked` decides it otherwise (top_check).
    `arms` are the arms it compares (for its explanation), `extra` more fields for report.json."""

    name: str
    metric: str
    diffs: list
    ranked: Optional[str] = None
    arms: tuple = ()
    extra: dict = field(default_factory=dict)

    def result(self, seeds=()):
        mean, ci = bootstrap(self.diffs)
        return {"name": self.name, "metric": self.metric, "mean_diff": mean, "ci90": ci, "outcome": self.ranked or outcome(ci),
                "diffs": [float(d) for d in self.diffs], "seeds": list(seeds)[: len(self.diffs)],
                "arms": [[a.task, a.name, a.script] for a in self.arms], **self.extra}


def top_check(name, metric, values: dict, group, among=None):
    """"One of `group` is best or fastest": X, the better of `group` by mean, against every other arm of `among` (default:
    every arm not in `group`) by the paired difference X - other: fails when some interval lies below 0, holds when none
    does and at least one lies above 0, inconclusive otherwise. Its difference: X minus the best other arm (by mean)."""
    means = {n: float(np.mean(v)) for n, v in values.items()}
    mine = max(group, key=lambda n: means[n])
    others = [n for n in (among or values) if n not in group and n in values]
    pairs = {n: bootstrap(np.subtract(values[mine], values[n])) for n in others}
    below, above = [n for n in others if pairs[n][1][1] < 0], [n for n in others if pairs[n][1][0] > 0]
    result = "fails" if below else "holds" if above else "inconclusive"
    other = max(others, key=lambda n: means[n])
    return Check(f"{name}: {mine} against every other method (best other: {other})", metric, list(np.subtract(values[mine], values[other])),
                 result, extra={"x": mine, "other": other, "pairs": {n: {"mean_diff": m, "ci90": ci} for n, (m, ci) in pairs.items()},
                                "beaten_by": below, "beats": above})


def fmt(values, digits=3):
    mean, (lo, hi) = bootstrap(values)
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


class Results:
    """The runs of a claim's arms over seeds, read back from disk, and their metrics (one value per seed)."""

    def __init__(self, out: Path, runs_of: Callable, budgets: dict, seeds=(), tuning=None, world=0):
        self.out, self.runs_of, self.budgets, self.seeds, self.tuning, self.world = out, runs_of, budgets, list(seeds), tuning, world

    @functools.lru_cache(maxsize=None)
    def rows(self, a: Arm):
        return [read_rows(self.out / r.key) for r in self.runs_of(a)]

    def status(self, a: Arm):
        """Per seed: {collapsed, collapse_iteration, worst_normalised} (done.json, or the rule on the rows)."""
        return [collapse(rows, a.task) for rows in self.rows(a)]

    def scale(self, a: Arm, x):
        """Gradient steps per response of `a`'s runs (x = "steps"), or 1 (x = "samples")."""
        if x == "samples":
            return 1.0
        opts = dict(self.runs_of(a)[0].options)
        return steps_per_iteration(a.script, opts) / responses_per_iteration(a.script, opts)

    def curves(self, a: Arm, key="eval/gold_reward", x="samples", norm=False):
        s = self.scale(a, x)
        return [normalised(rows, BEST[a.task], s) if norm else curve(rows, key, s) for rows in self.rows(a)]

    def area(self, a: Arm, x="samples", budget=None, grid=None):
        budget = budget or self.budgets[a.task][x]
        return [area(*(on_grid(cx, cy, grid) if grid else (cx, cy)), budget) for cx, cy in self.curves(a, x=x, norm=True)]

    def at_budget(self, a: Arm, x="samples", key="eval/gold_reward"):
        return [float(np.interp(self.budgets[a.task][x], cx, cy)) if len(cx) else math.nan for cx, cy in self.curves(a, key, x)]

    def reach(self, a: Arm, level, x="samples"):
        """Responses (or steps) to `level` of the room, censored at the budget (reported as the budget)."""
        return [min(reach(cx, cy, level), self.budgets[a.task][x]) for cx, cy in self.curves(a, x=x, norm=True)]

    def final(self, a: Arm, key="eval/gold_reward"):
        return [final(rows, key) if any(key in r for r in rows) else math.nan for rows in self.rows(a)]

    def summary(self, a: Arm, x="samples"):
        b = self.budgets[a.task][x]
        unit = "responses" if x == "samples" else "steps"
        collapsed = [s for s, c in zip(self.seeds, self.status(a)) if c["collapsed"]]
        return (f"{a.task:12s} {a.name:22s} area {fmt(self.area(a, x))}   gold at the budget {fmt(self.at_budget(a, x))}   "
                f"{unit} to 50% {fmt(self.reach(a, 0.5, x), 4)}, to 90% {fmt(self.reach(a, 0.9, x), 4)} (censored at {b})" +
                (f"   collapsed: seeds {collapsed}" if collapsed else ""))


AREA = "area over the budget (responses)"
AREA_STEPS = "area over the budget (gradient steps)"


# --------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt


def reward_label(task):
    return "gold reward (mean R_mu, 0-1)" if task in BANDITS else "gold reward (-tokens)"


def band(ax, res, a, key="eval/gold_reward", x="samples", budget=True, clip=True, **style):
    """The mean over seeds of `key` against responses (or gradient steps), with its 90% bootstrap band; the budget
    dotted, and (clip) the curve cut at the first evaluation past it (a run longer for another claim)."""
    curves = res.curves(a, key, x)
    n = min(len(cx) for cx, _ in curves)
    if clip:
        n = min(n, int(np.searchsorted(curves[0][0], res.budgets[a.task][x])) + 1)
    xs, ys = curves[0][0][:n], np.array([cy[:n] for _, cy in curves])
    line = ax.plot(xs, ys.mean(0), label=style.pop("label", a.name), **style)[0]
    if len(ys) > 1:
        means = ys[np.random.default_rng(0).integers(0, len(ys), (2000, len(ys)))].mean(1)
        ax.fill_between(xs, *np.quantile(means, [0.05, 0.95], axis=0), color=line.get_color(), alpha=0.15)
    if budget:
        ax.axvline(res.budgets[a.task][x], color="gray", ls=":", lw=1)
    ax.set_xlabel("responses" if x == "samples" else "gradient steps")
    ax.grid(alpha=0.3)


def ranked_chart(ax, values: dict, title, highlight=(), dim=()):
    """Each arm's mean with its 90% interval, best first; `highlight` in red, `dim` (methods outside the checks) faded."""
    ranks = ranking(values)
    for i, r in enumerate(ranks):
        color = "tab:red" if r["name"] in highlight else "tab:gray" if r["name"] in dim else "tab:blue"
        ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["ci90"][0]], [r["ci90"][1] - r["mean"]]], fmt="o", capsize=3, color=color)
    ax.set_yticks(range(len(ranks)), [f"{r['rank']}. {r['name']}" for r in ranks])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")


def save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


# -------------------------------------------------------------------------------------------- claims
@dataclass
class Claim:
    number: int
    words: str  # docs/paper.md section 5, verbatim
    arms: list  # [(Arm, length)]: length "budget", "full", "steps" (claim 7's budget in gradient steps) or None (the toy)
    judge: Callable  # (Results) -> (lines: [str], checks: [Check])
    plot: Callable  # (Results, path) -> None


def claims(extra_methods=()):
    """The nine experiments, each check quoting the words it tests; `extra_methods` (declared methods beyond the paper's 14)
    join claim 5's leaderboard, not its checks."""
    out = []

    # 1: on-policy beats offline where the peak is unlikely under pi_ref; the gap shrinks where it is likely
    pairs1, unlikely1 = [("online_dpo", "dpo"), ("best_of_n", "best_of_n --offline")], {"bandit_r1": "bandit_r2", "min_length": "mode_length"}
    tasks1 = [t for u in unlikely1.items() for t in u]

    def gap(res, on, off, t):
        return np.subtract(res.area(arm_of(on, t)), res.area(arm_of(off, t)))

    def judge1(res):
        lines = [res.summary(arm_of(n, t)) for t in tasks1 for pair in pairs1 for n in pair]
        checks = []
        for on, off in pairs1:
            for u, likely in unlikely1.items():
                checks.append(Check(f'{u}: "on-policy methods beat their offline counterparts": {on} > {off}', AREA, list(gap(res, on, off, u)),
                                    arms=(arm_of(on, u), arm_of(off, u))))
                checks.append(Check(f'"the gap shrinks or vanishes" where the peak is likely: {on} - {off} smaller on {likely} than on {u}',
                                    AREA, list(gap(res, on, off, u) - gap(res, on, off, likely)),
                                    arms=(arm_of(on, u), arm_of(off, u), arm_of(on, likely), arm_of(off, likely))))
        return lines, checks

    def plot1(res, path):
        plt = _plt()
        fig, axes = plt.subplots(len(pairs1), len(tasks1), figsize=(14, 6.5))
        for i, (on, off) in enumerate(pairs1):
            for j, t in enumerate(tasks1):
                band(axes[i, j], res, arm_of(on, t), label=f"{on} (on-policy)")
                band(axes[i, j], res, arm_of(off, t), label=f"{off} (offline)", ls="--")
                axes[i, j].set_title(f"{t}: peak {'unlikely' if t in unlikely1 else 'likely'} under pi_ref")
                axes[i, j].set_ylabel(reward_label(t))
                axes[i, j].legend()
        fig.suptitle("Claim 1: on-policy vs offline where the peak is unlikely (R1, min) or likely (R2, mode); "
                     "90% bands over seeds, dotted: the budget")
        save(fig, path)

    out.append(Claim(1, "Geometry: when the reward peak lies where pi_ref is unlikely (R1, Min Length), on-policy methods beat their "
                        "offline counterparts; when the peak is where pi_ref is likely (R2, Mode Length), the gap shrinks or vanishes.",
                     [(arm_of(n, t), "budget") for pair in pairs1 for n in pair for t in tasks1], judge1, plot1))

    # 2: on the skewed data, on-policy methods beat the offline ones that use the same data
    pairs2 = [("online_dpo", "dpo"), ("online_ipo", "ipo"), ("best_of_n", "best_of_n --offline")]

    def judge2(res):
        lines, checks = [], []
        for on, off in pairs2:
            a, b = arm_of(on, "skew_length"), arm_of(off, "skew_length")
            lines += [res.summary(a), res.summary(b), f"{'':12s} full-length final gold: {on} {fmt(res.final(a))}, {off} {fmt(res.final(b))}, "
                      f"difference {fmt(np.subtract(res.final(a), res.final(b)))}"]
            d = gap(res, on, off, "skew_length")
            checks.append(Check(f'skew_length: "On-policy sampling helps even when the reward model was learned from the same preference '
                                f'data": {on} > {off}', AREA, list(d), arms=(a, b)))
            checks.append(Check(f'"most clearly under poor coverage (Skew Length)": {on} - {off} larger on skew_length than on min_length',
                                AREA, list(d - gap(res, on, off, "min_length")), arms=(a, b, arm_of(on, "min_length"), arm_of(off, "min_length"))))
        return lines, checks

    def plot2(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(pairs2), figsize=(14, 3.8), sharey=True)
        for ax, (on, off) in zip(axes, pairs2):
            band(ax, res, arm_of(on, "skew_length"), clip=False, label=f"{on} (on-policy, proxy RM from the same data)")
            band(ax, res, arm_of(off, "skew_length"), clip=False, label=f"{off} (offline, the skewed pairs)", ls="--")
            ax.legend()
        axes[0].set_ylabel(reward_label("skew_length"))
        fig.suptitle("Claim 2: skew_length, preference data that covers pi_ref's lengths poorly (full length; dotted: the budget)")
        save(fig, path)

    out.append(Claim(2, "On-policy sampling helps even when the reward model was learned from the same preference data the offline "
                        "methods use; most clearly under poor coverage (Skew Length).",
                     [(arm_of(n, "skew_length"), "full") for pair in pairs2 for n in pair] +
                     [(arm_of(n, "min_length"), "budget") for pair in pairs2 for n in pair], judge2, plot2))

    # 3: offline, a negative gradient beats maximum likelihood; BoN + negative gradient beats BoN
    tasks3, neg3, ml3 = ["bandit_r1", "min_length"], ["dpo", "ipo"], ["pref_ft", "best_of_n --offline", "rwr --offline"]
    names3 = neg3 + ml3 + ["best_of_n", "best_of_n_neg"]

    def judge3(res):
        lines = [res.summary(arm_of(n, t)) for t in tasks3 for n in names3]
        checks = []
        for t in tasks3:
            for n in neg3:
                for m in ml3:
                    checks.append(Check(f'{t}: "Offline, a negative gradient beats maximum likelihood": {n} > {m}', AREA,
                                        list(np.subtract(res.area(arm_of(n, t)), res.area(arm_of(m, t)))), arms=(arm_of(n, t), arm_of(m, t))))
            checks.append(Check(f'{t}: "BoN + negative gradient beats plain BoN": best_of_n_neg > best_of_n', AREA,
                                list(np.subtract(res.area(arm_of("best_of_n_neg", t)), res.area(arm_of("best_of_n", t)))),
                                arms=(arm_of("best_of_n_neg", t), arm_of("best_of_n", t))))
        return lines, checks

    def plot3(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks3), figsize=(12, 3.8))
        for ax, t in zip(axes, tasks3):
            ranked_chart(ax, {n: res.area(arm_of(n, t)) for n in names3}, f"{t} (red: negative gradient)", highlight=neg3 + ["best_of_n_neg"])
            ax.set_xlabel("area over the budget (share of the room above pi_ref)")
        fig.suptitle("Claim 3: negative gradient vs maximum likelihood; mean and 90% interval over seeds, * the top group")
        save(fig, path)

    out.append(Claim(3, "Offline, a negative gradient beats maximum likelihood: DPO/IPO > Pref-FT, offline Best-of-N, RWR on R1 / Min "
                        "Length; BoN + negative gradient beats plain BoN.",
                     [(arm_of(n, t), "budget") for t in tasks3 for n in names3], judge3, plot3))

    # 4: DPO's margin grows more than Pref-FT's; log pi(y_w) may fall
    def growth(res, a, key):
        return [final(rows, key) - next(r[key] for r in rows if key in r) for rows in res.rows(a)]

    def judge4(res):
        lines, checks = [], []
        for t in tasks3:
            for n in ("dpo", "pref_ft"):
                a = arm_of(n, t)
                fell = sum(g < 0 for g in growth(res, a, "logps/chosen"))
                lines.append(f"{t:12s} {n:8s} rewards/margins growth {fmt(growth(res, a, 'rewards/margins'))}; logps/chosen "
                             f"{fmt([next(r['logps/chosen'] for r in rows if 'logps/chosen' in r) for rows in res.rows(a)])} -> "
                             f"{fmt(res.final(a, 'logps/chosen'))}: fell in {fell} of {len(res.rows(a))} seeds")
            dpo, pref_ft = (growth(res, arm_of(n, t), "rewards/margins") for n in ("dpo", "pref_ft"))
            checks.append(Check(f"{t}: \"The DPO margin grows more than Pref-FT's\": growth of rewards/margins, dpo - pref_ft",
                                "full-length final (last five iterations) minus the first iteration", list(np.subtract(dpo, pref_ft)),
                                arms=(arm_of("dpo", t), arm_of("pref_ft", t))))
        return lines, checks

    def plot4(res, path):
        plt = _plt()
        fig, axes = plt.subplots(2, len(tasks3), figsize=(12, 6))
        for j, t in enumerate(tasks3):
            for n, ls in (("dpo", "-"), ("pref_ft", "--")):
                band(axes[0, j], res, arm_of(n, t), key="rewards/margins", budget=False, clip=False, ls=ls)
                band(axes[1, j], res, arm_of(n, t), key="logps/chosen", budget=False, clip=False, ls=ls)
            axes[0, j].set_ylabel("beta (h(y_w) - h(y_l)), nats")
            axes[1, j].set_ylabel("log pi(y_w | x), nats")
            for i in range(2):
                axes[i, j].set_title(t)
                axes[i, j].legend()
        fig.suptitle("Claim 4: the implicit-reward margin and the chosen log-likelihood over training (90% bands over seeds)")
        save(fig, path)

    out.append(Claim(4, "The DPO margin grows more than Pref-FT's; log pi(y_w) itself may fall when y_w and y_l are similar.",
                     [(arm_of(n, t), "full") for t in tasks3 for n in ("dpo", "pref_ft")], judge4, plot4))

    # 5: on-policy + negative gradient is best or fastest; complementary
    methods5 = PAPER_METHODS + [m for m in extra_methods if m not in PAPER_METHODS]
    group5 = ("online_dpo", "online_ipo")

    def judge5(res):
        lines, checks = [], []
        for t in TASKS:
            values = {n: res.area(arm_of(n, t)) for n in methods5}
            lines.append(f"{t}: " + ", ".join(f"{r['rank']}. {r['name']} {r['mean']:.3f} [{r['ci90'][0]:.3f}, {r['ci90'][1]:.3f}]"
                                              + ("+" if r["name"] not in PAPER_METHODS else "") for r in ranking(values)))
            top = top_check(f'{t}: "on-policy + negative gradient (online DPO/IPO) is best or fastest"', AREA, values, group5, PAPER_METHODS)
            top.arms = tuple(arm_of(n, t) for n in dict.fromkeys([top.extra['x'], top.extra['other']] + top.extra['beaten_by']))
            checks.append(top)
            for other in ("dpo", "best_of_n"):
                checks.append(Check(f'{t}: "Complementary": online_dpo > {other}', AREA, list(np.subtract(values["online_dpo"], values[other])),
                                    arms=(arm_of("online_dpo", t), arm_of(other, t))))
        lines += ["(rank. arm, mean area [90% interval]; + a method beyond the paper's 14, outside the checks)", "",
                  "gold reward at the budget (KL(pi || pi_ref) there), mean over seeds:",
                  "| objective | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for n in methods5:
            cells = [f"{np.mean(res.at_budget(arm_of(n, t))):.3g} ({np.mean(res.at_budget(arm_of(n, t), key='eval/kl_ref')):.2g})" for t in TASKS]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return lines, checks

    def plot5(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(TASKS), figsize=(22, 4.6))
        for ax, t in zip(axes, TASKS):
            ranked_chart(ax, {n: res.area(arm_of(n, t)) for n in methods5}, f"{t} (budget {res.budgets[t]['samples']} responses)", group5,
                         dim=[n for n in methods5 if n not in PAPER_METHODS])
            ax.set_xlabel("area (share of the room above pi_ref)")
        fig.suptitle("Claim 5: every method's area over the budget, mean and 90% interval over seeds; red: online DPO / IPO, "
                     "gray: beyond the paper's 14 (outside the checks)")
        save(fig, path)

    out.append(Claim(5, "Complementary: on-policy + negative gradient (online DPO/IPO) is best or fastest.",
                     [(arm_of(n, t), "budget") for t in TASKS for n in methods5], judge5, plot5))

    # 6: sample reuse on bandit_r1
    epochs6, methods6, nonrl6 = [1, 2, 4, 8], ["online_dpo", "best_of_n", "ppo"], ["online_dpo", "best_of_n"]

    def arm6(m, e):  # T = 1 is every script's default: the same runs as claims 1 and 5
        return arm(m, "bandit_r1", **({"update_epochs": e} if e > 1 else {}))

    def judge6(res):
        lines, checks = [], []
        steps = min(c[0][-1] for m in methods6 for e in epochs6 for c in res.curves(arm6(m, e), x="steps"))
        for m in methods6:
            lines += [res.summary(arm6(m, e)) for e in epochs6]
            lines.append(f"{'':12s} {m}: area against gradient steps over the {steps:.0f} steps every arm reaches: " +
                         ", ".join(f"T={e} {fmt(res.area(arm6(m, e), 'steps', steps))}" for e in epochs6))
        area6 = {(m, e): np.array(res.area(arm6(m, e))) for m in methods6 for e in epochs6}
        for m in methods6:
            checks.append(Check(f'bandit_r1: "a little helps (T = 2 > T = 1 in the bandit)": {m}', AREA, list(area6[m, 2] - area6[m, 1]),
                                arms=(arm6(m, 2), arm6(m, 1))))
        for m in nonrl6:
            checks.append(Check(f'bandit_r1: "much hurts non-RL methods": {m} T = 8 < T = 2', AREA, list(area6[m, 2] - area6[m, 8]),
                                arms=(arm6(m, 2), arm6(m, 8))))
        for m in nonrl6:
            checks.append(Check(f'bandit_r1: "PPO tolerates it best": ppo loses less than {m} from T = 2 to T = 8', AREA,
                                list((area6[m, 2] - area6[m, 8]) - (area6["ppo", 2] - area6["ppo", 8])),
                                arms=(arm6(m, 2), arm6(m, 8), arm6("ppo", 2), arm6("ppo", 8))))
        return lines, checks

    def plot6(res, path):
        plt = _plt()
        fig, axes = plt.subplots(2, len(methods6), figsize=(14, 7), sharey=True)
        for j, m in enumerate(methods6):
            for i, x in enumerate(("samples", "steps")):
                for e in epochs6:
                    band(axes[i, j], res, arm6(m, e), x=x, budget=x == "samples", clip=x == "samples", label=f"T={e}")
                axes[i, j].set_title(f"{m}, against {'responses' if x == 'samples' else 'gradient steps'}")
                axes[i, j].legend()
            axes[0, j].set_ylabel(reward_label("bandit_r1"))
            axes[1, j].set_ylabel(reward_label("bandit_r1"))
        fig.suptitle("Claim 6: sample reuse on bandit_r1 (T passes over each batch): equal responses, T times the gradient steps")
        save(fig, path)

    out.append(Claim(6, "Sample reuse: a little helps (T = 2 > T = 1 in the bandit); much hurts non-RL methods; PPO tolerates it best.",
                     [(arm6(m, e), "budget") for m in methods6 for e in epochs6], judge6, plot6))

    # 7: fresher data (smaller B at fixed M) gives more reward per gradient step on min_length
    tasks7 = ["min_length", "mode_length"]

    def arm7(t, b):  # M = 16 is every script's default; evaluated every iteration at B >= 256, every 2 below, all along
        return arm("online_dpo", t, f"online_dpo B={b}", batch_size=b, eval_dense_every=1 if b >= 256 else 2, eval_dense_until=10 ** 6)

    def judge7(res):
        lines = [res.summary(arm7(t, b), "steps") for t in tasks7 for b in SIZES7]
        lines.append(f"the checks compare areas on the evaluations every arm shares, every {STEP_ROUND} gradient steps (B = 512's iterations)")
        d = {t: np.subtract(*(res.area(arm7(t, b), "steps", grid=STEP_ROUND) for b in (64, 512))) for t in tasks7}
        metric = f"{AREA_STEPS}, evaluations every {STEP_ROUND} steps"
        checks = [Check('min_length: "Fresher data (smaller B at fixed M) gives more reward per gradient step on Min Length": B = 64 > B = 512',
                        metric, list(d["min_length"]), arms=(arm7("min_length", 64), arm7("min_length", 512))),
                  Check('"little difference on Mode Length": B = 64 - B = 512 smaller on mode_length than on min_length', metric,
                        list(d["min_length"] - d["mode_length"]), arms=tuple(arm7(t, b) for t in tasks7 for b in (64, 512)))]
        return lines, checks

    def plot7(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks7), figsize=(11, 3.8))
        for ax, t in zip(axes, tasks7):
            for b in SIZES7:
                band(ax, res, arm7(t, b), x="steps", label=f"B={b} ({b // MINIBATCH7} steps per collection)")
            ax.set_title(t)
            ax.set_ylabel(reward_label(t))
            ax.legend()
        fig.suptitle(f"Claim 7: online DPO, fresher data (smaller B) at fixed M={MINIBATCH7}, against gradient steps (dotted: the budget)")
        save(fig, path)

    out.append(Claim(7, "Fresher data (smaller B at fixed M) gives more reward per gradient step on Min Length; little difference on "
                        "Mode Length.", [(arm7(t, b), "steps") for t in tasks7 for b in SIZES7], judge7, plot7))

    # 8: the mode-seeking toy (deterministic: one value per check)
    toy = Arm("mode_seeking", "toy")

    def judge8(res):
        (r,) = res.rows(toy)
        slow, fast = r["starts"].values()
        lines = [f"{name}: steps to 90% of p's target mass: forward {s['steps_to_goal']['forward']}, reverse {s['steps_to_goal']['reverse']}; "
                 f"mass after 25 steps: forward {s['forward'][25]:.3f}, reverse {s['reverse'][25]:.3f}" for name, s in r["starts"].items()]
        never = 10 ** 9
        checks = [Check('"gradient descent on reverse KL concentrates mass on a target mode much faster than on forward KL" (from a start with '
                        'some mass there)', "steps to 90% of p's target mass, forward - reverse (the toy is deterministic)",
                        [(fast["steps_to_goal"]["forward"] or never) - (fast["steps_to_goal"]["reverse"] or never)]),
                  Check('"though it starts slowly when q is near 0 there" (from pi_data)', "mass after 25 steps, forward - reverse",
                        [slow["forward"][25] - slow["reverse"][25]])]
        return lines, checks

    def plot8(res, path):
        load_script("mode_seeking", "benchmarks").plot(res.rows(toy)[0], path)

    out.append(Claim(8, "Mode-seeking toy: on a categorical distribution, gradient descent on reverse KL concentrates mass on a target mode "
                        "much faster than on forward KL, though it starts slowly when q is near 0 there.", [(toy, None)], judge8, plot8))

    # 9: HyPO keeps KL far below DPO's at equal or better reward
    tasks9 = ["min_length", "skew_length"]

    def judge9(res):
        lines, checks = [], []
        for t in tasks9:
            h, d = arm("hypo", t), arm("dpo", t)
            kh, kd = np.array(res.final(h, "eval/kl_ref")), np.array(res.final(d, "eval/kl_ref"))
            gh, gd = np.array(res.final(h)), np.array(res.final(d))
            room = BEST[t] - np.array([rows[0]["eval/gold_reward"] for rows in res.rows(h)])
            lines.append(f"{t:12s} full-length final: hypo gold {fmt(gh)} KL {fmt(kh)}; dpo gold {fmt(gd)} KL {fmt(kd)}")
            lines += [res.summary(h), res.summary(d)]
            checks.append(Check(f"{t}: \"HyPO keeps KL(pi_theta || pi_ref) far below DPO's\": hypo's KL below half of dpo's",
                                "full-length final eval/kl_ref: dpo / 2 - hypo", list(kd / 2 - kh), arms=(h, d)))
            checks.append(Check(f'{t}: "at equal or better reward": hypo\'s gold not below dpo\'s by more than 5% of the room',
                                "full-length final gold, (hypo - dpo) / room + 0.05", list((gh - gd) / room + 0.05), arms=(h, d)))
        return lines, checks

    def plot9(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks9), figsize=(11, 3.8))
        for ax, t in zip(axes, tasks9):
            for n, marker in (("hypo", "o"), ("dpo", "s")):
                kl, gold = res.curves(arm(n, t), "eval/kl_ref"), res.curves(arm(n, t))
                m = min(len(c[1]) for c in kl)
                ax.plot(np.mean([c[1][:m] for c in kl], 0), np.mean([c[1][:m] for c in gold], 0), marker=marker,
                        label=f"{n} (each point an evaluation, mean over seeds)")
            ax.set_title(t)
            ax.set_xlabel("KL(pi || pi_ref), nats")
            ax.set_ylabel(reward_label(t))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Claim 9: reward against KL to pi_ref over training (full length), HyPO vs DPO")
        save(fig, path)

    out.append(Claim(9, "HyPO keeps KL(pi_theta || pi_ref) far below DPO's at equal or better reward.",
                     [(arm(n, t), "full") for t in tasks9 for n in ("hypo", "dpo")], judge9, plot9))
    return {c.number: c for c in out}


# ------------------------------------------------------------------------------------------- driver
def name_of(a: Arm):
    """The tuning file's name of an arm's method: its script and declared variant switches ("best_of_n --offline")."""
    variants = declaration(a.script)["variants"] if a.script != "mode_seeking" else []
    return " ".join([a.script] + [f"--{k}" for k, v in a.options if v == "" and k in variants])


def tuning_entry(tuning, a: Arm):
    """The tuning file's entry of `a`'s method on its task, or None."""
    if tuning is None or a.script == "mode_seeking":
        return None
    return tuning["scripts"].get(name_of(a), {}).get(a.task)


def tuned_options(a: Arm, tuning):
    """The tuned learning rate and knob of `a`'s method on its task, from the tuning file (none without one)."""
    if tuning is None or a.script == "mode_seeking":
        return ()
    entry = tuning_entry(tuning, a)
    if entry is None or entry["learning_rate"] is None:
        raise SystemExit(f"{tuning['path']} has no tuned values for {name_of(a)} on {a.task}: rerun --tune with every script and task")
    opts = [("learning-rate", f"{entry['learning_rate']:g}")]
    knob = knob_of(a.script)
    if knob and entry.get(knob[0]) is not None:  # an issue-19 file has none for best_of_n_neg's beta: the script's default
        opts.append((knob[0].replace("_", "-"), f"{entry[knob[0]]:g}"))
    return tuple(opts)


def interior(tuning, a: Arm):
    """(whether `a`'s tuned rate and knob are interior in their grids, a few words saying so)."""
    entry = tuning_entry(tuning, a)
    if entry is None:
        return False, "not tuned"
    knob = knob_of(a.script)
    words = [f"lr {entry['learning_rate']:g}" + (" at its grid's edge" if entry.get("edge") else " at the ladder's limit" if entry.get("at_limit")
                                                  else " unstable" if entry.get("stable") is False else "")]
    ok = not entry.get("edge") and not entry.get("at_limit") and entry.get("stable", True)
    if knob and entry.get(knob[0]) is not None:
        edge, limit = entry.get(f"{knob[0]}_edge"), entry.get(f"{knob[0]}_at_limit")
        words.append(f"{knob[0]} {entry[knob[0]]:g}" + (" at its grid's edge" if edge else " at its limit" if limit else ""))
        ok = ok and not edge and not limit
    return ok, f"{name_of(a)} on {a.task}: " + ", ".join(words)


def read_tuning(path):
    """The tuning file, or None where there is none; a one-line error where it cannot be read."""
    if not Path(path).exists():
        return None
    try:
        tuning = json.loads(Path(path).read_text())
        tuning["budgets"], tuning["scripts"]  # noqa: B018
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"--tuning {path}: not a tuning result ({err!r}); rerun `python benchmarks/study.py --tune`") from None
    protocol = tuning.get("protocol")  # the issue-19 file's "protocol" is a sentence: protocol 1
    return tuning | {"path": str(path), "protocol": protocol if isinstance(protocol, int) else 1}


def budgets_for(tasks, tuning, quick, max_iterations):
    """{task: {"samples": budget, "steps": budget, "full": length}}: from the tuning file, else (only --quick, tests)
    a quarter of the full length; claim 7's 256 gradient steps either way. --quick halves the full length."""
    out = {}
    for t in tasks:
        full = FULL[t] // (2 if quick else 1)
        if tuning is not None:
            b = tuning["budgets"].get(t)
            if b is None:
                raise SystemExit(f"{tuning['path']} has no budget for {t}: rerun --tune on every task")
            out[t] = {"samples": min(b["samples"], full), "steps": STEPS_BUDGET[t], "full": full}
        else:
            out[t] = {"samples": FULL[t] // 4, "steps": STEPS_BUDGET[t], "full": full}
        if max_iterations:  # a pipeline test: nothing reaches past the cap
            out[t] = {k: min(v, max_iterations * (BATCH if k != "steps" else BATCH // MINIBATCH7)) for k, v in out[t].items()}
    return out


def plan(chosen, seeds, budgets, tuning, max_iterations=None):
    """{(claim number, arm): [run per seed]}, each run as long as its longest use across the chosen claims."""
    wanted = {}
    for c in chosen:
        for a, length in c.arms:
            unit = "steps" if length == "steps" else "samples"
            size = budgets[a.task][{"budget": "samples", "full": "full", "steps": "steps"}[length]] if length else 0
            tuned = tuned_options(a, tuning)
            wanted[c.number, a] = [make_run(a, s, size, unit, tuned, max_iterations) for s in ([1] if length is None else seeds)]
    longer = longest([r for rs in wanted.values() for r in rs])
    return {k: [longer[r] for r in rs] for k, rs in wanted.items()}


def sparse(chosen, runs_of, budgets):
    """The arms compared by area with fewer than MIN_EVALUATIONS evaluations inside their budget (claim 7's: fewer than
    SHARED7 shared ones after iteration 0): [(claim, arm name, task, count)]."""
    problems = []
    for c in chosen:
        for a, length in c.arms:
            if length is None:
                continue
            run = runs_of[c.number, a][0]
            opts = dict(run.options)
            if length == "steps":
                per, need = steps_per_iteration(a.script, opts), SHARED7 + 1
                n = sum(i * per % STEP_ROUND == 0 and i * per <= budgets[a.task]["steps"] for i in evaluation_iterations(run))
            else:
                per, need = responses_per_iteration(a.script, opts), MIN_EVALUATIONS
                n = sum(i * per <= budgets[a.task]["samples"] for i in evaluation_iterations(run))
            if n < need:
                problems.append((c.number, a.name, a.task, n))
    return problems


def run_cost(run):
    """The cost model's seconds for one run on one idle core (COST)."""
    if run.arm.script == "mode_seeking":
        return 2.0
    start, per_iteration, per_evaluation = COST["bandit" if run.arm.task in BANDITS else "length"]
    scale = responses_per_iteration(run.arm.script, dict(run.options)) / BATCH
    return start + run.iterations * per_iteration * scale + len(evaluation_iterations(run)) * per_evaluation


def dry_run(runs, label, workers=1):
    """Print the runs, iterations, evaluations, responses and estimated seconds per script (what --dry-run shows); the
    estimated seconds of all of them."""
    per = {}
    for r in set(runs):
        s = per.setdefault(r.arm.script, [0, 0, 0, 0, 0.0])
        if r.arm.script != "mode_seeking":
            s[1] += r.iterations
            s[2] += len(evaluation_iterations(r))
            s[3] += r.iterations * responses_per_iteration(r.arm.script, dict(r.options))
        s[0] += 1
        s[4] += run_cost(r)
    total = sum(s[4] for s in per.values())
    print(f"{label}: {sum(s[0] for s in per.values())} runs, about {total:,.0f} s of runs on one core: {total / workers / 3600:.1f} h "
          f"at {workers} workers")
    print("| script | runs | iterations | evaluations | responses | estimated s |\n|---|---|---|---|---|---|")
    for script, s in sorted(per.items()):
        print(f"| {script} | {s[0]} | {s[1]} | {s[2]} | {s[3]} | {s[4]:,.0f} |")
    return total


def prebuild(tasks, world=0):
    """Build every task's cache once for `world` (a subprocess with CLEANPREF_WORLD_SEED set, as the runs get it), before
    runs race to build it; returns {task: task.info["fingerprint"] or None}."""
    code = ("import json, sys\nsys.path.insert(0, %r)\nfrom tasks import make_task\nfor t in %r:\n"
            "    print('FINGERPRINT ' + json.dumps([t, make_task(t).info.get('fingerprint')], default=str), flush=True)\n") % (str(ROOT), list(tasks))
    env = dict(os.environ, CLEANPREF_WORLD_SEED=str(world), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    fingerprints = {}
    for line in proc.stdout:
        if line.startswith("FINGERPRINT "):
            t, fp = json.loads(line[len("FINGERPRINT "):])
            fingerprints[t] = fp
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"building the tasks of world {world} failed (exit {proc.returncode}); see the lines above")
    return fingerprints


def check_worlds(fingerprints: dict):
    """Refuse a world after the first whose fingerprints are missing or equal to the first's: it cannot be told apart."""
    first, *others = fingerprints
    for w in others:
        for t, fp in fingerprints[w].items():
            if fp is None or fingerprints[first].get(t) is None:
                raise SystemExit(f"--world-seeds {w}: tasks/ records no task.info['fingerprint'] for {t}, so world {w} cannot be told from "
                                 f"world {first}; pass --world-seeds {first} until tasks/ selects worlds by CLEANPREF_WORLD_SEED")
            if fp == fingerprints[first][t]:
                raise SystemExit(f"--world-seeds {w}: {t} has the same fingerprint as in world {first} ({fp}): CLEANPREF_WORLD_SEED does "
                                 f"not change it; pass --world-seeds {first}")


# ---------------------------------------------------------------------------------------- report.json
CHECK_KEYS1 = {"name", "metric", "mean_diff", "ci90", "outcome"}
CHECK_KEYS2 = CHECK_KEYS1 | {"diffs", "seeds", "arms"}
ARM_KEYS = {"script", "task", "unit", "budget", "seeds", "area", "gold_at_budget", "final_gold", "final_kl", "collapsed", "area_mean", "area_ci90"}


def _check_problems(where, ch, keys):
    problems = []
    if not keys <= set(ch) or ch["outcome"] not in ("holds", "fails", "inconclusive") or len(ch["ci90"]) != 2 or not ch["ci90"][0] <= ch["ci90"][1]:
        return [f"{where}: malformed check {ch}"]
    if "diffs" in keys:
        mean, ci = bootstrap(ch["diffs"])
        if len(ch["diffs"]) != len(ch["seeds"]) or not math.isclose(mean, ch["mean_diff"], rel_tol=1e-9, abs_tol=1e-12) or \
                not np.allclose(ci, ch["ci90"], rtol=1e-9, atol=1e-12):
            problems.append(f"{where}: check {ch['name']!r}: its mean or interval is not its per-seed differences'")
        if "pairs" not in ch and ch["outcome"] != outcome(ch["ci90"]):
            problems.append(f"{where}: check {ch['name']!r}: outcome {ch['outcome']} does not follow from its interval")
    return problems


def validate_report(report):
    """The problems of a report.json against its schema (an empty list: it conforms). Protocol 1 (the issue-19 report, no
    "protocol" key) keeps its own schema; protocol 2 adds the arms' per-seed values and every check's differences."""
    protocol = report.get("protocol", 1)
    top = ("seeds", "tuning_seeds", "wall_s", "workers", "claims") + (("arms", "worlds", "budgets", "world_seeds") if protocol == 2 else ())
    problems = [f"missing {k}" for k in top if k not in report]
    if protocol not in (1, 2):
        return problems + [f"unknown protocol {protocol!r}"]
    keys = CHECK_KEYS2 if protocol == 2 else CHECK_KEYS1
    for number, c in report.get("claims", {}).items():
        if c.get("verdict") not in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE") or not c.get("checks"):
            problems.append(f"claim {number}: verdict {c.get('verdict')!r}, {len(c.get('checks', []))} checks")
        for ch in c.get("checks", []):
            if protocol == 1 and set(ch) != keys:
                problems.append(f"claim {number}: malformed check {ch}")
                continue
            problems += _check_problems(f"claim {number}", ch, keys)
            for w, other in ch.get("worlds", {}).items() if protocol == 2 else ():
                problems += _check_problems(f"claim {number} world {w}", other, {"mean_diff", "ci90", "outcome", "diffs", "seeds", "agrees"})
                if other.get("agrees") != (other.get("outcome") == ch.get("outcome")):
                    problems.append(f"claim {number} world {w}: 'agrees' does not match the outcomes")
        if c.get("checks") and c.get("verdict") != verdict([ch.get("outcome") for ch in c["checks"]]):
            problems.append(f"claim {number}: verdict {c['verdict']} does not follow from its checks")
    for w, tasks in report.get("arms", {}).items() if protocol == 2 else ():
        for t, arms in tasks.items():
            for name, rec in arms.items():
                n = len(rec.get("seeds", []))
                if not ARM_KEYS <= set(rec) or not n or any(len(rec[k]) != n for k in ("area", "gold_at_budget", "final_gold", "final_kl", "collapsed")):
                    problems.append(f"arm {name} on {t} (world {w}): missing per-seed values")
                elif not math.isclose(float(np.mean(rec["area"])), rec["area_mean"], rel_tol=1e-9, abs_tol=1e-12) or \
                        not rec["area_ci90"][0] <= rec["area_mean"] <= rec["area_ci90"][1] + 1e-12:
                    problems.append(f"arm {name} on {t} (world {w}): area_mean or area_ci90 is not its areas'")
    return problems


def clean(value):
    """JSON-safe: NaN and inf -> None, numpy numbers -> floats, recursively."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def arm_record(res: Results, a: Arm, unit, tuning):
    """report.json's record of an arm: per seed its area, gold at the budget, final gold and KL, collapse; the area's
    mean and 90% interval; its tuned values."""
    x = "steps" if unit == "steps" else "samples"
    areas = res.area(a, x, grid=STEP_ROUND if x == "steps" else None)
    status = res.status(a)
    mean, ci = bootstrap(areas)
    run = res.runs_of(a)[0]
    rec = {"script": a.script, "task": a.task, "options": dict(a.options), "unit": "gradient steps" if x == "steps" else "responses",
           "budget": res.budgets[a.task][x], "responses": run.iterations * responses_per_iteration(a.script, dict(run.options)),
           "seeds": res.seeds, "area": areas, "gold_at_budget": res.at_budget(a, x), "final_gold": res.final(a),
           "final_kl": res.final(a, "eval/kl_ref"), "collapsed": [s["collapsed"] for s in status],
           "collapse_iteration": [s["collapse_iteration"] for s in status], "worst_normalised": [s["worst_normalised"] for s in status],
           "area_mean": mean, "area_ci90": ci}
    entry = tuning_entry(tuning, a)
    if entry is not None:
        knob = knob_of(a.script)
        rec["tuned"] = {"learning_rate": entry["learning_rate"], "interior": interior(tuning, a)[0]} | (
            {knob[0]: entry.get(knob[0])} if knob else {})
    return clean(rec)


# ------------------------------------------------------------------------------------- explanations
def explain(result: dict, check: Check, res: Results, tuning, units: dict):
    """Two or three lines under a failing or inconclusive check, from the per-seed data; and its label ("disagrees with the
    paper" when it fails with every arm interior in its grids and no arm collapsed on any seed)."""
    arms = list(dict.fromkeys(check.arms))
    if not arms:
        return [], None
    seeds, diffs = res.seeds[: len(result["diffs"])], result["diffs"]
    parts, bad = [], set()
    for a in arms:
        hit = [(s, st, rows) for s, st, rows in zip(seeds, res.status(a), res.rows(a)) if st["collapsed"]]
        if not hit:
            continue
        bad |= {s for s, _, _ in hit}
        where = []
        for s, st, rows in hit:
            row = next((r for r in rows if r.get("iteration") == st["collapse_iteration"] and "eval/gold_reward" in r), {})
            eos = f"EOS {row['eval/eos_rate']:.2f}, " if a.task in LENGTH_TASKS and "eval/eos_rate" in row else ""
            where.append(f"seed {s} at iteration {st['collapse_iteration']} ({eos}KL {row.get('eval/kl_ref', math.nan):.3g})")
        worst = min(st["worst_normalised"] for _, st, _ in hit)
        parts.append(f"{a.name} on {a.task} collapsed: {'; '.join(where)}; worst normalised gold {worst:.2f}")
    lines = []
    if parts:
        keep = [i for i, s in enumerate(seeds) if s not in bad]
        if len(keep) >= 2:
            m, ci = bootstrap([diffs[i] for i in keep])
            tail = f"excluding them (seeds {', '.join(str(seeds[i]) for i in keep)}): {m:+.3g} [{ci[0]:+.3g}, {ci[1]:+.3g}], {outcome(ci)}"
        elif keep:
            tail = f"on the one seed without a collapse ({seeds[keep[0]]}): {diffs[keep[0]]:+.3g}"
        else:
            tail = "every seed has a collapse"
        lines.append("; ".join(parts) + "; " + tail)
    else:
        lines.append("no arm of this check collapsed on any seed")
    stats = []
    for a in arms[:4]:
        x = units.get(a, "samples")
        keys = [("gold", "eval/gold_reward", ".3g"), ("KL", "eval/kl_ref", ".3g")] + (
            [("EOS", "eval/eos_rate", ".2f"), ("length", "eval/response_length", ".3g")] if a.task in LENGTH_TASKS else [])
        words = [f"{word} {np.mean(v):{spec}}" for word, key, spec in keys if np.all(np.isfinite(v := res.at_budget(a, x, key)))]
        if all(any("logps/chosen" in r for r in rows) for rows in res.rows(a)):
            words.append(f"final log pi(y_w) {np.mean(res.final(a, 'logps/chosen')):.3g}")
        stats.append(f"{a.name} ({a.task}) " + ", ".join(words))
    lines.append(("at the budget, means over seeds: " if len(arms) <= 4 else f"at the budget ({len(arms)} arms, the first 4): ") + "; ".join(stats))
    grids = [interior(tuning, a) for a in arms]
    edges = [words for ok, words in grids if not ok]
    lines.append("tuned values: every arm interior in its grids" if not edges else "not interior: " + "; ".join(edges[:4]))
    label = None
    if result["outcome"] == "fails":
        label = "disagrees with the paper" if not parts and not edges else "fails with collapses" if parts else \
            "fails with a tuned value at the edge of its grid"
    return lines, label


def checks_figure(res: Results, pairs, path, units):
    """The per-seed normalised curves of the arms of each failing or inconclusive check (one panel per check, its first 4 arms)."""
    plt = _plt()
    n = len(pairs)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(n / cols)), squeeze=False)
    for ax, (result, check) in zip(axes.flat, pairs):
        for j, a in enumerate(list(dict.fromkeys(check.arms))[:4]):
            x = units.get(a, "samples")
            for k, (cx, cy) in enumerate(res.curves(a, x=x, norm=True)):
                ax.plot(cx, cy, color=f"C{j}", lw=0.9, alpha=0.8, label=f"{a.name} ({a.task})" if k == 0 else None)
            ax.axvline(res.budgets[a.task][x], color=f"C{j}", ls=":", lw=1)
        ax.axhline(COLLAPSE_BELOW, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{result['outcome']}: {result['name'][:70]}", fontsize=7)
        ax.set_ylabel("normalised gold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Checks that fail or are inconclusive: each arm's curve on every seed (dotted: its budget; dashed: the collapse line)")
    save(fig, path)


def objective_figure(res: Results, script, methods, path):
    """Gold against responses on the five tasks, mean and 90% band over seeds, for each method of `script` (variants apart)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(TASKS), figsize=(22, 3.8))
    for ax, t in zip(axes, TASKS):
        for m in methods:
            band(ax, res, arm_of(m, t), clip=False, label=m)
        ax.set_title(f"{t} (budget {res.budgets[t]['samples']} responses, dotted)")
        ax.set_ylabel(reward_label(t))
        ax.legend()
    fig.suptitle(f"{script}: gold reward against responses at its tuned values (90% bands over seeds)")
    save(fig, path)


def beyond(res: Results, values_by_task: dict, extra):
    """"Beyond the paper": each method outside the paper's 14 against its nearest sibling on every task (rank, area, the
    paired difference). Returns (markdown lines, report.json dict)."""
    lines, out = [], {}
    for m in extra:
        sib = SIBLINGS.get(m.split()[0])
        out[m] = {"sibling": sib, "tasks": {}}
        lines += ["", f"**{m}**" + (f" against {sib}" if sib else " (no sibling named in SIBLINGS)"), "",
                  "| task | rank | area [90% CI] | collapsed seeds |" + (f" {sib}: rank, area | {m} - {sib} [90% CI] |" if sib else ""),
                  "|---|---|---|---|" + ("---|---|" if sib else "")]
        for t, values in values_by_task.items():
            ranks = {r["name"]: r for r in ranking(values)}
            r = ranks[m]
            st = [s for s, c in zip(res.seeds, res.status(arm_of(m, t))) if c["collapsed"]]
            entry = {"rank": r["rank"], "of": len(values), "area_mean": r["mean"], "area_ci90": r["ci90"], "collapsed_seeds": st}
            cells = f"| {t} | {r['rank']} of {len(values)} | {r['mean']:.3f} [{r['ci90'][0]:.3f}, {r['ci90'][1]:.3f}] | {st or 'none'} |"
            if sib:
                d = np.subtract(values[m], values[sib])
                dm, dci = bootstrap(d)
                entry |= {"sibling_rank": ranks[sib]["rank"], "sibling_area_mean": ranks[sib]["mean"], "sibling_area_ci90": ranks[sib]["ci90"],
                          "diff_mean": dm, "diff_ci90": dci, "diffs": list(d), "outcome": outcome(dci)}
                cells += f" {ranks[sib]['rank']}, {ranks[sib]['mean']:.3f} | {dm:+.3f} [{dci[0]:+.3f}, {dci[1]:+.3f}] ({outcome(dci).replace('holds', 'ahead').replace('fails', 'behind')}) |"
            out[m]["tasks"][t] = entry
            lines.append(cells)
    return lines, clean(out)


# ---------------------------------------------------------------------------------- objective pages
def _involves(report, number, ch, script):
    if "arms" in ch:
        return script in {a[2] for a in ch["arms"]}
    single = {1: None, 7: "online_dpo", 8: "mode_seeking"}.get(int(number))  # issue-19 checks name their scripts, but claim 7's
    return single == script or re.search(rf"(?<![\w-]){re.escape(script)}(?!\w)", ch["name"]) is not None


def objective_results(report, script) -> str:
    """The Markdown block of `script`'s results for docs/objectives/<script>.md, from report.json: per task a table of its
    arms (area [90% CI], gold at the budget, final KL, collapsed seeds), then the checks that involve it. A protocol-1
    report (issue 19, no per-arm data) gives the checks and a line saying which command makes the table."""
    protocol = report.get("protocol", 1)
    checks = [(n, ch) for n, c in sorted(report["claims"].items(), key=lambda kv: int(kv[0])) for ch in c["checks"] if _involves(report, n, ch, script)]
    lines = []
    if protocol == 2:
        world = str(report["world_seeds"][0])
        lines += [f"From `benchmarks/study.py` (protocol 2, world {world}, seeds {report['worlds'][world]['seeds']}; the study rewrites this "
                  "block). Area: the mean of the normalised gold over the task's budget with its 90% bootstrap interval over seeds; gold at "
                  "the budget and final KL(pi || pi_ref): means over seeds; collapsed: the seeds that collapsed (docs/study.md)."]
        for t in TASKS:
            recs = [(name, rec) for name, rec in report["arms"].get(world, {}).get(t, {}).items() if rec["script"] == script]
            if not recs:
                continue
            lines += ["", f"**{t}** (budget {report['budgets'][t]['samples']} responses)", "",
                      "| arm | area [90% CI] | gold at budget | final KL | collapsed |", "|---|---|---|---|---|"]
            for name, rec in recs:
                down = [s for s, c in zip(rec["seeds"], rec["collapsed"]) if c]
                unit = "" if rec["unit"] == "responses" else f" (over {rec['budget']} gradient steps)"
                lines.append(f"| {name}{unit} | {rec['area_mean']:.3f} [{rec['area_ci90'][0]:.3f}, {rec['area_ci90'][1]:.3f}] | "
                             f"{np.mean(rec['gold_at_budget']):.3g} | {np.nanmean([np.nan if v is None else v for v in rec['final_kl']]):.3g} | "
                             f"{', '.join(map(str, down)) or 'none'} |")
    else:
        lines += ["From the issue-19 study (`benchmarks/figures/report.json`, protocol 1, seeds "
                  f"{report['seeds']}), which kept no per-arm values. The per-task table (area, gold at the budget, final KL, collapsed "
                  "seeds) comes with the protocol-2 re-run: `python benchmarks/study.py --tune --workers 2` then "
                  "`python benchmarks/study.py --workers 2`."]
    lines += ["", f"Checks that involve {script} (docs/paper.md section 5; the difference is signed so that the claim predicts it positive):", ""]
    if checks:
        lines += ["| claim | check | difference [90% CI] | outcome |", "|---|---|---|---|"]
        lines += [f"| {n} | {ch['name'].replace('|', '/')} | {ch['mean_diff']:+.3g} [{ch['ci90'][0]:+.3g}, {ch['ci90'][1]:+.3g}] | {ch['outcome']}"
                  + (f" ({ch['label']})" if ch.get("label") else "") + " |" for n, ch in checks]
    else:
        lines.append("none of the nine claims' checks involves it.")
    if protocol == 2:
        lines += ["", f"![{script}: gold reward against responses on the five tasks](../../benchmarks/figures/objectives/{script}.png)"]
    return "\n".join(lines)


def update_pages(report, docs_dir) -> list:
    """In each docs/objectives/<script>.md that exists, replace the text between PAGE_START and PAGE_END with
    objective_results(report, script). Returns the pages it changed."""
    changed = []
    for script in objective_scripts():
        page = Path(docs_dir) / "objectives" / f"{script}.md"
        if not page.exists():
            continue
        text = page.read_text()
        if PAGE_START not in text or PAGE_END not in text:
            print(f"{page}: no {PAGE_START} ... {PAGE_END} lines; left as it is")
            continue
        head, rest = text.split(PAGE_START, 1)
        _, tail = rest.split(PAGE_END, 1)
        new = head + PAGE_START + "\n" + objective_results(report, script) + "\n" + PAGE_END + tail
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


# ------------------------------------------------------------------------------------------ the study
def _scenario_tuning(tuning, size):
    """A protocol-2 copy of an issue-19 tuning file with budgets size(task), for --dry-run's cost scenarios (a temporary file)."""
    import tempfile

    scenario = {k: v for k, v in tuning.items() if k != "path"} | {"protocol": 2, "budgets": {t: {"samples": size(t)} for t in TASKS}}
    handle, name = tempfile.mkstemp(suffix=".json", prefix="study_scenario_")
    with os.fdopen(handle, "w") as f:
        json.dump(scenario, f)
    return name


def run_claims(args: Args, out: Path, figures: Path):
    scripts = objective_scripts()
    tuning = read_tuning(args.tuning)
    if tuning is None and not args.quick:
        raise SystemExit(f"--tuning {args.tuning} does not exist: run `python benchmarks/study.py --tune` first (or pass --quick)")
    extra = [m for m in methods_of(scripts) if m not in PAPER_METHODS]
    untuned = [m for m in extra if tuning is not None and not all(t in tuning["scripts"].get(m, {}) for t in TASKS)]
    extra = [m for m in extra if m not in untuned]
    all_claims = claims(extra)
    unknown = [c for c in args.claims if c not in all_claims]
    if unknown:
        raise SystemExit(f"unknown claim ids {unknown}: choose among {sorted(all_claims)}")
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3, 4, 5])
    worlds = args.world_seeds if args.world_seeds is not None else ([0] if args.quick else [0, 1])
    chosen = [all_claims[c] for c in args.claims]
    if tuning is not None and tuning["protocol"] == 1 and not (args.quick or args.max_iterations):
        if not args.dry_run:
            raise SystemExit(f"--tuning {args.tuning} is the issue-19 tuning (protocol 1): its budgets are shorter than protocol 2's 16 "
                             "iterations and its rates were picked by a rule protocol 2 replaces; run `python benchmarks/study.py --tune` first")
        for scenario, size in (("every budget at its floor, 16 iterations", lambda t: BUDGET_FLOOR),
                               ("every budget the full length", lambda t: FULL[t])):
            print(f"the tuning file is protocol 1 (issue 19); protocol 2's budgets come from --tune. Scenario: {scenario}")
            path = _scenario_tuning(tuning, size)
            try:
                run_claims(Args(**{**vars(args), "tuning": path}), out, figures)
            finally:
                os.unlink(path)
        return None
    budgets = budgets_for(TASKS, tuning, args.quick, args.max_iterations)
    plans = {}  # world -> (its seeds, its claims, {(claim, arm): [run per seed]})
    for i, w in enumerate(worlds):
        mine = chosen if i == 0 else [c for c in chosen if c.number in WORLD_CLAIMS]
        if mine:
            s = seeds if i == 0 else seeds[:WORLD_SEEDS]
            plans[w] = (s, mine, plan(mine, s, budgets, tuning, args.max_iterations))
    if not (args.quick or args.max_iterations):
        few = [p for w, (s, mine, runs_of) in plans.items() for p in sparse(mine, runs_of, budgets)]
        if few:
            raise SystemExit(f"too few evaluations inside the budget (claim, arm, task, count): {few[:5]}")
    first = worlds[0]
    dirs = {w: out if w == first else out / f"world{w}" for w in plans}
    if args.dry_run:
        total = 0.0
        for w, (s, mine, runs_of) in plans.items():
            total += dry_run([r for rs in runs_of.values() for r in rs], f"world {w}: claims {[c.number for c in mine]}, seeds {s}", args.workers)
        print(f"in all: about {total:,.0f} s of runs, {total / args.workers / 3600:.1f} h at {args.workers} workers (the cost model: +-15%)"
              + (f"; not tuned, so left out of claim 5: {untuned}" if untuned else ""))
        return None
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = {}
    for w, (s, mine, runs_of) in plans.items():
        fingerprints[w] = prebuild(sorted({r.arm.task for rs in runs_of.values() for r in rs if r.arm.task in TASKS and script_exists(r.arm.script)}),
                                   w) or {}
    if len(plans) > 1:
        check_worlds(fingerprints)
    start = time.time()
    launchers = {w: Launcher(dirs[w], args.workers, env={"CLEANPREF_WORLD_SEED": str(w)}) for w in plans}
    for w, (s, mine, runs_of) in plans.items():
        launchers[w].launch([r for rs in runs_of.values() for r in rs])
    judged = {}  # world -> claim number -> (result, lines, [(check result, Check)], Results, units)
    for w, (s, mine, runs_of) in plans.items():
        judged[w] = {}
        for c in mine:
            runs = [r for a, _ in c.arms for r in runs_of[c.number, a]]
            missing = sorted({r.arm.script for r in runs if not script_exists(r.arm.script)})
            failed = [r.key for r in runs if script_exists(r.arm.script) and not launchers[w].done(r)]
            units = {a: "steps" if length == "steps" else "samples" for a, length in c.arms}
            if missing:
                judged[w][c.number] = ("MISSING", [f"scripts not in algos/ yet: {', '.join(missing)}"], [], None, units)
            elif failed:
                judged[w][c.number] = ("FAILED", [f"run failed: {k}" + (f"\n{launchers[w].failed[k]}" if k in launchers[w].failed else " (see its stderr.txt)")
                                                  for k in dict.fromkeys(failed)], [], None, units)
            else:
                res = Results(dirs[w], lambda a, n=c.number, ro=runs_of: ro[n, a], budgets, s, tuning, w)
                lines, checks = c.judge(res)
                pairs = [(ch.result(s), ch) for ch in checks]
                judged[w][c.number] = (verdict([p[0]["outcome"] for p in pairs]), lines, pairs, res, units)
                if w == first:  # the other worlds' numbers are in the report; their figures would repeat these
                    c.plot(res, figures / f"claim{c.number}.png")
    wall = time.time() - start
    seeds_of = {w: p[0] for w, p in plans.items()}
    report = {"protocol": 2, "seeds": seeds, "world_seeds": list(plans), "tuning_seeds": tuning["tuning_seeds"] if tuning else [],
              "tuning": {"path": str(tuning["path"]), "protocol": tuning["protocol"]} if tuning else None,
              "wall_s": round(wall, 1), "workers": args.workers, "budgets": budgets,
              "worlds": {str(w): {"seeds": seeds_of[w], "claims": [c.number for c in plans[w][1]], "fingerprints": fingerprints.get(w, {})} for w in plans},
              "arms": {}, "claims": {}}
    sections, summary = [], []
    for w in plans:
        arms_w = report["arms"].setdefault(str(w), {})
        for number, (result, lines, pairs, res, units) in judged[w].items():
            if res is None:
                continue
            for a, length in all_claims[number].arms:
                if length is not None and a.name not in arms_w.get(a.task, {}):
                    arms_w.setdefault(a.task, {})[a.name] = arm_record(res, a, units[a], tuning)
    figure_lines = {}
    for c in chosen:
        result, lines, pairs, res, units = judged[first][c.number]
        checks = []
        explained = []
        for i, (r, ch) in enumerate(pairs):
            r = dict(r)
            if r["outcome"] != "holds":
                why, label = explain(r, ch, res, tuning, units)
                r["explanation"], r["label"] = why, label
                if ch.arms:
                    explained.append((r, ch))
            for w in plans:
                if w != first and c.number in judged[w] and judged[w][c.number][3] is not None:
                    o = judged[w][c.number][2][i][0]
                    r.setdefault("worlds", {})[str(w)] = {k: o[k] for k in ("name", "mean_diff", "ci90", "outcome", "diffs", "seeds")} | {
                        "agrees": o["outcome"] == r["outcome"]}
            checks.append(clean(r))
        if res is not None:
            report["claims"][str(c.number)] = {"verdict": result, "checks": checks} | {
                f"world{w}_verdict": judged[w][c.number][0] for w in plans if w != first and c.number in judged[w]}
            if explained:
                checks_figure(res, explained, figures / f"claim{c.number}_checks.png", units)
                figure_lines[c.number] = f"![claim {c.number}: the checks that fail or are inconclusive, per seed](claim{c.number}_checks.png)\n"
        text = []
        for r in checks:
            line = f"- **{r['outcome']}** {r['name']}: {r['mean_diff']:+.4g} [{r['ci90'][0]:+.4g}, {r['ci90'][1]:+.4g}] ({r['metric']})"
            for w, o in r.get("worlds", {}).items():
                line += f"; world {w}: {o['outcome']} {o['mean_diff']:+.3g} [{o['ci90'][0]:+.3g}, {o['ci90'][1]:+.3g}], {'agrees' if o['agrees'] else 'DISAGREES'}"
            if r.get("label"):
                line += f" — **{r['label']}**"
            text.append(line)
            text += [f"  - {x}" for x in r.get("explanation", [])]
        others = "".join(f"; world {w}: {judged[w][c.number][0]}" for w in plans if w != first and c.number in judged[w])
        sections.append(f"\n## Claim {c.number}: {result}{others}\n> {c.words}\n\n" + "\n".join(text) + ("\n" if text else "") +
                        "\n```\n" + "\n".join(lines) + "\n```\n" + (f"![claim {c.number}](claim{c.number}.png)\n" if checks else "") +
                        figure_lines.get(c.number, ""))
        summary.append({"claim": c.number, "verdict": result, "checks": checks, "numbers": lines})
    # collapses, per world, arm and task
    down = [(w, t, name, rec) for w, tasks in report["arms"].items() for t, arms in tasks.items() for name, rec in arms.items() if any(rec["collapsed"])]
    collapse_text = ("\n## Collapses\n\nSeeds that collapsed (normalised gold below -1, or EOS rate below 0.5 on a length task, at an "
                     "evaluation after iteration 0), per arm and task:\n\n| world | task | arm | collapsed | seeds (iteration) |\n"
                     "|---|---|---|---|---|\n" + "".join(
                         f"| {w} | {t} | {name} | {sum(rec['collapsed'])} of {len(rec['seeds'])} | " +
                         ", ".join(f"{s} ({it})" for s, c_, it in zip(rec["seeds"], rec["collapsed"], rec["collapse_iteration"]) if c_) + " |\n"
                         for w, t, name, rec in down) if down else "\n## Collapses\n\nNo run collapsed.\n")
    beyond_text = ""
    if 5 in judged[first] and judged[first][5][3] is not None and extra:
        res5 = judged[first][5][3]
        methods5 = PAPER_METHODS + extra
        lines_b, report["beyond"] = beyond(res5, {t: {m: res5.area(arm_of(m, t)) for m in methods5} for t in TASKS}, extra)
        beyond_text = ("\n## Beyond the paper\n\nMethods declared in algos/ beyond the paper's 14, in claim 5's leaderboard (not in its "
                       "checks): rank among all " + str(len(methods5)) + " methods by mean area, and the paired difference against the "
                       "nearest paper method.\n" + "\n".join(lines_b) + "\n")
    if untuned:
        beyond_text += f"\nNot tuned, so not run: {', '.join(untuned)} (`python benchmarks/study.py --tune --tune-scripts ... --tune-merge`).\n"
    if 5 in judged[first] and judged[first][5][3] is not None:
        res5 = judged[first][5][3]
        for script in scripts:
            methods = [m for m in PAPER_METHODS + extra if m.split()[0] == script]
            if methods:
                objective_figure(res5, script, methods, figures / "objectives" / f"{script}.png")
    report = clean(report)
    problems = validate_report(report)
    assert not problems, problems
    shown = tuning and (Path(tuning["path"]).resolve().relative_to(ROOT) if Path(tuning["path"]).resolve().is_relative_to(ROOT) else tuning["path"])
    source = f"budgets, rates and knobs from {shown} (protocol {tuning['protocol']}, tuning seeds {tuning['tuning_seeds']})" if tuning else \
        "no tuning file: budgets a quarter of the full length, the scripts' default rates (--quick)"
    if tuning and set(seeds) & set(tuning["tuning_seeds"]):
        source += f"; WARNING: seeds {sorted(set(seeds) & set(tuning['tuning_seeds']))} were also tuned on"
    runs_all = {r for w in plans for rs in plans[w][2].values() for r in rs}
    worlds_text = "".join(f"World {w} (CLEANPREF_WORLD_SEED={w}; seeds {seeds_of[w]}; claims {[c.number for c in plans[w][1]]}): " +
                          ("; ".join(f"{t} {json.dumps(fp, sort_keys=True)}" for t, fp in fingerprints.get(w, {}).items()) or "fingerprints not read") + ".\n"
                          for w in plans)
    header = (f"# cleanpref study: {len(chosen)} claims, seeds {seeds}{' (quick: not the result)' if args.quick else ''}\n\n"
              f"{len(runs_all)} runs; this invocation {wall / 60:.1f} min at {args.workers} workers (the runs alone: "
              f"{sum(launchers[w].wall([r for rs in plans[w][2].values() for r in rs]) for w in plans) / 60:.1f} min one after another); {source}.\n"
              "Budgets (responses; claim 7 in gradient steps): " +
              ", ".join(f"{t} {b['samples']} ({b['steps']} steps)" for t, b in budgets.items()) +
              ". Intervals: 90% bootstrap over seeds of the mean paired difference (protocol 2, issue 27: study.py's docstring).\n\n" + worlds_text)
    counts = [" / ".join(str(sum(ch["outcome"] == o for ch in s["checks"])) for o in ("holds", "fails", "inconclusive")) for s in summary]
    later = [w for w in plans if w != first]
    table = ("\n| claim | verdict | holds / fails / inconclusive |" + "".join(f" world {w} |" for w in later) + "\n|---|---|---|" + "---|" * len(later) +
             "\n" + "\n".join(f"| {s['claim']} | {s['verdict']} | {n} |" + "".join(
                 f" {judged[w][s['claim']][0] if s['claim'] in judged[w] else '-'} |" for w in later) for s, n in zip(summary, counts)))
    text = header + table + "\n" + collapse_text + "".join(sections) + beyond_text
    print(text)
    try:
        for d in [out] + ([figures] if figures != out else []):
            d.mkdir(parents=True, exist_ok=True)
            (d / "report.md").write_text(text)
            (d / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    except OSError as err:
        raise SystemExit(f"cannot write the report under {out}: {err} (disk full?); the runs are kept, rerun to resume") from None
    pages = args.pages or (ROOT / "docs" if figures.resolve() == (ROOT / "benchmarks" / "figures").resolve() and not args.quick and
                           not args.max_iterations and set(args.claims) == set(range(1, 10)) else None)
    if pages:
        for page in update_pages(report, pages):
            print(f"results written into {page}")
    print(f"report: {out / 'report.md'}, {out / 'report.json'}; figures: {figures}/")
    return summary


# ------------------------------------------------------------------------------------------- tuning
def neighbour(value, direction, ladder=LADDER):
    """The next value on `ladder` from the one nearest `value`, up (+1) or down (-1), 0 the nearest itself; None past its end."""
    i = min(range(len(ladder)), key=lambda j: abs(math.log(ladder[j] / value)))
    return ladder[i + direction] if 0 <= i + direction < len(ladder) else None


def knob_ladder(untuned, limits=KNOB_LIMITS):
    """The half-decade ladder through a knob's untuned value, two significant digits (0.02: ..., 0.0063, 0.02, 0.063, ...),
    within `limits`."""
    values = sorted({float(f"{untuned * 10 ** (k / 2):.2g}") for k in range(-24, 25)})
    return [v for v in values if limits[0] * (1 - 1e-9) <= v <= limits[1] * (1 + 1e-9)]


def within(value, limits):
    return value is not None and limits[0] * (1 - 1e-9) <= value <= limits[1] * (1 + 1e-9)


def pick(scores: dict, prefer=None):
    """The key with the best score (NaN or None: never picked); scores within TIE tie: `prefer` wins a tie if it is among
    them, else the smallest key."""
    finite = {k: s for k, s in scores.items() if s is not None and np.isfinite(s)}
    if not finite:
        return None
    top = max(finite.values())
    tied = sorted(k for k, s in finite.items() if s >= top - TIE)
    return prefer if prefer in tied else tied[0]


def extend(grid, winner, limits, ladder=LADDER, all_collapsed=False):
    """The grid with the next ladder value beyond an edge winner (within limits), or None where the winner needs none; a
    grid without a winner because every value collapsed gets the value below its smallest."""
    grid = sorted(grid)
    if winner is None:
        v = neighbour(grid[0], -1, ladder) if all_collapsed else None
        return [v] + grid if within(v, limits) else None
    if winner == grid[0] and within(v := neighbour(winner, -1, ladder), limits):
        return [v] + grid
    if winner == grid[-1] and within(v := neighbour(winner, +1, ladder), limits):
        return grid + [v]
    return None


def edge_flags(grid, winner, limits, ladder=LADDER):
    """(edge: the winner sits at an end of its grid that could be extended, at_limit: at an end that cannot)."""
    if winner is None:
        return False, False
    grid = sorted(grid)
    ends = [(winner == grid[0], -1), (winner == grid[-1], +1)]
    edge = any(at and within(neighbour(winner, d, ladder), limits) for at, d in ends)
    return edge, not edge and any(at for at, _ in ends)


def start_rates(method, task, how, limits):
    """The first grid: the method's current rate and its two ladder neighbours (how "defaults"), or LR_START ("fixed")."""
    module = load_script(method.split()[0])
    table = getattr(module, "OFFLINE_LEARNING_RATES", {}) if "--offline" in method.split() else \
        {t: d.get("learning_rate") for t, d in getattr(module, "TASK_DEFAULTS", {}).items()}
    lr = table.get(task)
    if how == "fixed" or lr is None:
        return [r for r in LR_START[task] if within(r, limits)]
    return [r for r in (neighbour(lr, -1), neighbour(lr, 0), neighbour(lr, +1)) if within(r, limits)]


class Tuner:
    """The tuning's state: per method and task a grid of learning rates (then of knob values), each value's runs (one
    per tuning seed), and the protocol's rules over them: score, winner, which seeds to run, budgets."""

    def __init__(self, launcher: Launcher, seeds, full, max_iterations=None):
        self.launcher, self.seeds, self.full, self.max_iterations = launcher, list(seeds), full, max_iterations
        self.points, self.owner, self.cache = {}, {}, {}
        launcher.skip = self.skip

    def point(self, m, t, lr, knob=None):
        """The key of (method, task, rate, knob value: the untuned one by default), creating its runs."""
        a = arm_of(m, t)
        k = knob_of(a.script)
        value = (k[1] if knob is None else knob) if k else None
        key = (m, t, lr, value)
        if key not in self.points:
            extra = (("learning-rate", f"{lr:g}"),) + (((k[0].replace("_", "-"), f"{value:g}"),) if k else ())
            self.points[key] = [make_run(Arm(a.script, t, a.options + extra), s, self.full[t], "samples", (), self.max_iterations) for s in self.seeds]
            self.owner |= {r.key: key for r in self.points[key]}
        return key

    def seed(self, run):
        """None while `run` is not done; else (its normalised curve, whether it collapsed)."""
        if run.key not in self.cache:
            status = self.launcher.status(run)
            if status is None:
                return None
            rows = read_rows(self.launcher.out / run.key)
            self.cache[run.key] = (normalised(rows, BEST[run.arm.task]), bool(status.get("collapsed")))
        return self.cache[run.key]

    def skip(self, run):
        """A later seed of a value whose earlier seed collapsed is not run: the value cannot win."""
        runs = self.points.get(self.owner.get(run.key), [])
        return any(r.seed != run.seed and (s := self.seed(r)) is not None and s[1] for r in runs[: runs.index(run)] if run in runs)

    def state(self, key, budget):
        """{collapsed, complete, areas (per seed, None where not run or collapsed), score (the median, complete values only),
        bounds (what the median can still be, where only the last seed is missing)}."""
        seeds = [self.seed(r) for r in self.points[key]]
        collapsed = any(s is not None and s[1] for s in seeds)
        areas = [None if s is None or s[1] else area(*s[0], budget) for s in seeds]
        known = [a for a in areas if a is not None]
        complete = not collapsed and len(known) == len(seeds)
        st = {"collapsed": collapsed, "complete": complete, "areas": areas, "score": float(np.median(known)) if complete else None,
              "collapses": [None if s is None else s[1] for s in seeds]}
        if not collapsed and len(seeds) >= 3 and seeds[-1] is None and len(known) == len(seeds) - 1:
            st["bounds"] = (float(np.median(known + [-math.inf])), float(np.median(known + [math.inf])))
        return st

    def winner(self, grid: dict, budget, prefer=None):
        """The best complete value of `grid` ({value: key}) at `budget`, never a collapsing one."""
        return pick({v: self.state(k, budget)["score"] for v, k in grid.items()}, prefer)

    def candidates(self, grid: dict, budget):
        """The values whose last seed can change the winner: those whose median can still reach the best complete score, or
        (none complete yet) the one with the largest least-possible median."""
        states = {v: self.state(k, budget) for v, k in grid.items()}
        partial = {v: s["bounds"] for v, s in states.items() if "bounds" in s}
        complete = [s["score"] for s in states.values() if s["complete"]]
        if not partial:
            return []
        if complete:
            return [v for v, (lo, hi) in partial.items() if hi >= max(complete) - TIE]
        top = max(lo for lo, _ in partial.values())
        return [min(v for v, (lo, _) in partial.items() if lo >= top - TIE)]

    def launch(self, runs):
        self.launcher.launch(runs)
        if self.launcher.failed:
            raise SystemExit("tuning runs failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in self.launcher.failed.items()) +
                             "\nfix them and rerun the same command: finished runs are kept")

    def settle(self, grids: dict, budgets_now: Callable):
        """Run every value of `grids` ({(method, task): {value: key}}) on every seed but the last, in seed order (a later seed
        skipped once an earlier one collapsed), then the last seed where it can change the winner at the current budgets,
        until it can nowhere. Returns the budgets."""
        many = len(self.seeds) >= 3
        while True:
            runs = [r for g in grids.values() for k in g.values() for r in (self.points[k][:-1] if many else self.points[k])]
            self.launch(sorted(runs, key=lambda r: self.seeds.index(r.seed)))
            budgets = budgets_now()
            last = [self.points[g[v]][-1] for (m, t), g in grids.items() for v in self.candidates(g, budgets[t][0])] if many else []
            if not last:
                return budgets
            self.launch(last)

    def budgets(self, grids, tasks, budget_methods, fixed=None):
        """{task: (budget, trace, details)}: the fixed point budget -> winners -> budget from the full length (the docstring's
        Budgets), over `budget_methods`; `fixed` ({task: budget}) instead where given."""
        out = {}
        for t in tasks:
            if fixed:
                out[t] = (fixed[t], [fixed[t]], None)
                continue
            methods = [m for m in budget_methods if (m, t) in grids]

            def reaches_at(b, t=t, methods=methods):
                reaches = {}
                for m in methods:
                    w = self.winner(grids[m, t], b)
                    reaches[m] = [reach(*self.seed(r)[0], 0.9) for r in self.points[grids[m, t][w]]] if w is not None else [math.inf]
                return reaches

            b, trace = fixed_point(lambda b: budget_rule(reaches_at(b), BATCH, self.full[t])[0], self.full[t])
            _, middle, medians = budget_rule(reaches_at(b), BATCH, self.full[t])
            out[t] = (b, trace, {"median_reach90": middle, "reach90": medians})
        return out

    def rounds(self, grids, budgets_now, limits, ladders, cap, prefer=None, fallback_low=True):
        """Settle the grids, extend each past an edge winner, round after round, until no grid needs it (or `cap` rounds).
        Returns (budgets, rounds, the grids the cap stopped)."""
        n = 0
        while True:
            n += 1
            budgets = self.settle(grids, budgets_now)
            grown = {}
            for (m, t), g in grids.items():
                w = self.winner(g, budgets[t][0], prefer(m) if prefer else None)
                everyone = all(self.state(k, budgets[t][0])["collapsed"] for k in g.values())
                new = extend(list(g), w, limits, ladders(m, t), all_collapsed=everyone and fallback_low)
                if new is not None:
                    grown[m, t] = [v for v in new if v not in g]
            if not grown:
                return budgets, n, set()
            if cap and n >= cap:
                return budgets, n, set(grown)
            print(f"round {n}: extending {len(grown)} grids past their edge winners: " + ", ".join(f"{m} on {t}" for m, t in grown), flush=True)
            for (m, t), values in grown.items():
                for v in values:
                    grids[m, t][v] = self.key_of(m, t, v)

    def tune(self, grids, budgets_now, limits, ladders, cap, prefer=None, fallback_low=True):
        """`rounds`, then one refinement (x2 and /2 of each winner) and its runs. A refinement's runs can move a winner to an
        extendable end of its grid (kto on min_length: the third seed of the old edge rate overtook the refined winner);
        then those grids go through `rounds` and a refinement again, until no uncapped winner sits at such an end.
        Returns (budgets, rounds, the grids a cap stopped, {(method, task): the refined values})."""
        total, capped, refined, todo = 0, set(), {}, grids
        while True:
            budgets, n, stopped = self.rounds(todo, budgets_now, limits, ladders, cap, prefer, fallback_low)
            total, capped = total + n, capped | stopped
            for k, values in self.refine(todo, budgets, limits, prefer).items():
                refined.setdefault(k, []).extend(values)
            budgets = self.settle(grids, budgets_now)
            todo = {(m, t): g for (m, t), g in grids.items() if (m, t) not in capped and edge_flags(
                list(g), self.winner(g, budgets[t][0], prefer(m) if prefer else None), limits, ladders(m, t))[0]}
            if not todo:
                return budgets, total, capped, refined
            print("a refinement moved " + ", ".join(f"{m} on {t}" for m, t in todo) + " to an edge: extending again", flush=True)

    def refine(self, grids, budgets, limits, prefer=None):
        """x2 and /2 of each winner (within limits) join its grid. Returns {(method, task): [the values added]}."""
        added = {}
        for (m, t), g in grids.items():
            w = self.winner(g, budgets[t][0], prefer(m) if prefer else None)
            if w is None:
                continue
            for v in (float(f"{w / 2:.3g}"), float(f"{w * 2:.3g}")):
                if within(v, limits) and v not in g:
                    g[v] = self.key_of(m, t, v)
                    added.setdefault((m, t), []).append(v)
        return added


def run_tune(args: Args, out: Path):
    scripts = args.tune_scripts or objective_scripts()
    for s in scripts:
        declaration(s)  # one clear line for a script that declares nothing
    bad = [t for t in args.tune_tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"--tune-tasks: no such task {bad}; choose among {TASKS}")
    methods, tasks, seeds = methods_of(scripts), list(args.tune_tasks), list(args.tuning_seeds)
    complete = set(methods) == set(methods_of(objective_scripts())) and set(tasks) == set(TASKS) and not args.max_iterations
    existing = read_tuning(args.tuning)
    full = {t: min(FULL[t], args.max_iterations * BATCH) if args.max_iterations else FULL[t] for t in tasks}
    fixed = {t: min(existing["budgets"][t]["samples"], full[t]) for t in tasks} if (
        not complete and existing and existing["protocol"] == 2 and all(t in existing["budgets"] for t in tasks)) else None
    budget_methods = [m for m in methods if m in PAPER_METHODS] or methods
    how = "defaults" if args.tune_around_defaults else args.tune_start
    launcher, start = Launcher(out, args.workers, env={"CLEANPREF_WORLD_SEED": "0"}, stop_on_collapse=True), time.time()  # world 0
    tuner = Tuner(launcher, seeds, full, args.max_iterations)
    lr_grids = {(m, t): {lr: tuner.point(m, t, lr) for lr in sorted(args.tune_rates or start_rates(m, t, how, args.tune_limits))}
                for m in methods for t in tasks}
    knobbed = [(m, t) for m in methods for t in tasks if knob_of(m.split()[0])]
    if args.dry_run:
        first = [r for g in lr_grids.values() for k in g.values() for r in tuner.points[k]]
        dry_run(first, f"tuning, the first grids on every seed ({len(lr_grids)} learning-rate grids, seeds {seeds})", args.workers)
        per_point = len(seeds) - 1 + 0.5 if len(seeds) >= 3 else len(seeds)
        cost = {(m, t): run_cost(tuner.points[next(iter(g.values()))][0]) for (m, t), g in lr_grids.items()}
        lr_points = {k: len(g) + 0.5 + 2 for k, g in lr_grids.items()}
        expected = sum(lr_points[k] * per_point * cost[k] for k in lr_grids) + sum(4.5 * per_point * cost[k] for k in knobbed)
        runs = sum(lr_points[k] * per_point for k in lr_grids) + 4.5 * per_point * len(knobbed)
        print(f"expected in all: about {runs:.0f} runs, {expected:,.0f} s of runs, {expected / args.workers / 3600:.1f} h at {args.workers} "
              f"workers (the cost model: +-15%). Assumed: per learning-rate grid its {len(next(iter(lr_grids.values())))} first rates, half a rate "
              f"of extension (issue 19: 30 of 70 winners at an edge) and 2 refined; per knob grid ({len(knobbed)}) 2 new values, half an "
              f"extension and 2 refined; every value on {len(seeds) - 1 if len(seeds) >= 3 else len(seeds)} seeds and half of them on the "
              f"last; no saving counted for runs stopped at a collapse or seeds skipped after one")
        return None
    fingerprints = prebuild(tasks, 0) or {}
    ledger_path, restored = args.tune_ledger or (LEDGER if complete else None), 0
    if ledger_path:
        ledger = Ledger(ledger_path, fingerprints)
        restored = ledger.restore(out)
        launcher.finished = functools.partial(ledger.add, out)
        print(f"ledger {ledger_path}: {restored} finished runs restored into {out}; each run finished now is added to it", flush=True)

    def lr_budgets():
        return tuner.budgets(lr_grids, tasks, budget_methods, fixed)

    tuner.key_of = lambda m, t, v: tuner.point(m, t, v)
    budgets, lr_rounds, lr_capped, lr_refined = tuner.tune(lr_grids, lr_budgets, args.tune_limits, lambda m, t: LADDER, args.tune_rounds)
    final_budgets = {t: b[0] for t, b in budgets.items()}  # fixed from here on: the knob runs do not move them
    lr_winners = {}
    for (m, t), g in lr_grids.items():
        w = tuner.winner(g, final_budgets[t])
        lr_winners[m, t] = (w, True) if w is not None else (min(g), False)  # no stable rate: the smallest, flagged

    knob_grids, untuned = {}, {}
    for m, t in knobbed:
        field_, value = knob_of(m.split()[0])
        ladder = knob_ladder(value, args.tune_knob_limits)
        untuned[m] = value
        w = lr_winners[m, t][0]
        knob_grids[m, t] = {v: tuner.point(m, t, w, v) for v in (neighbour(value, -1, ladder), value, neighbour(value, 1, ladder)) if within(v, args.tune_knob_limits)}
    tuner.key_of = lambda m, t, v: tuner.point(m, t, lr_winners[m, t][0], v)
    knob_rounds, knob_capped, knob_refined = 0, set(), {}
    if knob_grids:
        def fixed_now():
            return {t: (b, [b], None) for t, b in final_budgets.items()}

        prefer = untuned.get
        _, knob_rounds, knob_capped, knob_refined = tuner.tune(knob_grids, fixed_now, args.tune_knob_limits,
                                                               lambda m, t: knob_ladder(untuned[m], args.tune_knob_limits), args.tune_rounds,
                                                               prefer, fallback_low=False)

    every = [r for rs in tuner.points.values() for r in rs]
    result = {"protocol": 2, "command": "python benchmarks/study.py " + " ".join(sys.argv[1:]), "tuning_seeds": seeds, "tasks": tasks,
              "methods": methods, "world_seed": 0, "fingerprints": fingerprints, "wall_s": round(time.time() - start, 1), "workers": args.workers,
              "runs": sum(launcher.done(r) for r in every), "runs_skipped": sum(not launcher.done(r) for r in every),
              "runs_stopped_at_collapse": sum(bool((launcher.status(r) or {}).get("stopped_at") is not None) for r in every),
              "runs_s": round(launcher.wall(every), 1), "runs_restored": restored, "rounds": lr_rounds, "knob_rounds": knob_rounds,
              "capped": sorted(f"{m} on {t}" for m, t in lr_capped | knob_capped),
              "protocol_text": "benchmarks/study.py's docstring, Budgets and Tuning (protocol 2, issue 27)",
              "budgets": {t: {"samples": final_budgets[t], "steps": STEPS_BUDGET[t], "full": full[t], "trace": budgets[t][1]} | (budgets[t][2] or {})
                          for t in tasks},
              "scripts": {}}

    def table(g, budget):
        states = {v: tuner.state(k, budget) for v, k in sorted(g.items())}
        return ({f"{v:g}": s["score"] for v, s in states.items()}, {f"{v:g}": s["areas"] for v, s in states.items()},
                {f"{v:g}": s["collapses"] for v, s in states.items()})

    edges_left = 0
    for (m, t), g in lr_grids.items():
        w, stable = lr_winners[m, t]
        scores, areas, collapses = table(g, final_budgets[t])
        edge, at_limit = edge_flags(list(g), w, args.tune_limits)
        edges_left += edge
        entry = {"learning_rate": w, "stable": stable, "edge": edge, "at_limit": at_limit, "capped": (m, t) in lr_capped,
                 "refined": lr_refined.get((m, t), []), "scores": scores, "areas": areas, "collapsed": collapses}
        if (m, t) in knob_grids:
            field_ = knob_of(m.split()[0])[0]
            kg = knob_grids[m, t]
            kw = tuner.winner(kg, final_budgets[t], untuned[m])
            kscores, kareas, kcollapses = table(kg, final_budgets[t])
            kedge, klimit = edge_flags(list(kg), kw, args.tune_knob_limits, knob_ladder(untuned[m], args.tune_knob_limits))
            edges_left += kedge
            entry |= {field_: kw if kw is not None else untuned[m], f"{field_}_untuned": untuned[m], f"{field_}_edge": kedge,
                      f"{field_}_at_limit": klimit, f"{field_}_capped": (m, t) in knob_capped, f"{field_}_refined": knob_refined.get((m, t), []),
                      f"{field_}_scores": kscores, f"{field_}_areas": kareas, f"{field_}_collapsed": kcollapses}
        result["scripts"].setdefault(m, {})[t] = entry
    result["edges_left"] = edges_left
    result = clean(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(result, indent=1) + "\n")
    where = f"{out / 'tuning.json'}"
    if complete:
        Path(args.tuning).write_text(json.dumps(result, indent=1) + "\n")
        where += f" and {args.tuning}"
    elif args.tune_merge and existing and existing["protocol"] == 2:
        merged = {k: v for k, v in existing.items() if k not in ("path", "protocol")} | {"protocol": 2}
        for m, per_task in result["scripts"].items():
            merged["scripts"].setdefault(m, {}).update(per_task)
        merged.setdefault("merged", []).append(result["command"])
        Path(args.tuning).write_text(json.dumps(merged, indent=1) + "\n")
        where += f", merged into {args.tuning}"
    else:
        where += f" only (a partial tuning; the study reads it with --tuning {out / 'tuning.json'}" + (
            ", or add it to a protocol-2 --tuning with --tune-merge)" if existing and existing["protocol"] == 2 else ")")
    print_tuning(result)
    print(f"\ntuning: {where}")
    return result


def print_tuning(result):
    """The budgets, every score and winner, and the TASK_DEFAULTS rows the tuning implies (to paste into the scripts)."""
    print("\nbudgets (responses): twice the median method's median responses to 90% of the room, at least 16 iterations:")
    for t, b in result["budgets"].items():
        print(f"  {t}: {b['samples']} (median method's reach {b.get('median_reach90') or math.inf:.0f}; fixed point {b.get('trace')})")
    for m, per_task in result["scripts"].items():
        script, offline = m.split()[0], "--offline" in m.split()
        print(f"\n{m}: median area over the budget, seeds {result['tuning_seeds']} (x: a seed collapsed; ~: seeds left out, it could not win)")
        knob = knob_of(script)
        for t, e in per_task.items():
            def row(scores, collapses):
                return ", ".join(f"{v}: " + ("x" if any(collapses[v] or []) else "~" if s is None else f"{s:.3f}") for v, s in scores.items())
            flags_ = "".join(f" ({w})" for w, on in (("EDGE", e["edge"]), ("at limit", e.get("at_limit")), ("UNSTABLE", not e.get("stable", True)),
                                                     ("capped", e.get("capped"))) if on)
            line = f"  {t}: {row(e['scores'], e['collapsed'])} -> {e['learning_rate']}{flags_}"
            if knob and f"{knob[0]}_scores" in e:
                line += f"; {knob[0]} {row(e[f'{knob[0]}_scores'], e[f'{knob[0]}_collapsed'])} -> {e[knob[0]]}" + (
                    " (EDGE)" if e[f"{knob[0]}_edge"] else "")
            print(line)
        rows = {t: e for t, e in per_task.items() if e["learning_rate"] is not None}
        if offline:
            print(f"{script}.py: OFFLINE_LEARNING_RATES = dict(" + ", ".join(f"{t}={e['learning_rate']:g}" for t, e in rows.items()) + ")")
            continue
        print(f"{script}.py (num_iterations: the full length in responses; {result['command']}):\nTASK_DEFAULTS = {{")
        for t, e in rows.items():
            iterations = math.ceil(FULL[t] / responses_per_iteration(script, {}))
            kl = f", {knob[0]}={e[knob[0]]:g}" if knob and e.get(knob[0]) is not None else ""
            print(f'    "{t}": dict(num_iterations={iterations}, learning_rate={e["learning_rate"]:g}{kl}),')
        print("}")


def main(args: Args):
    out = Path(args.out or ("runs/study_quick" if args.quick else "runs/study"))
    if args.tune:
        return run_tune(args, out / "tune")
    figures = Path(args.figures or (out / "figures" if args.quick else ROOT / "benchmarks" / "figures"))
    return run_claims(args, out, figures)


if __name__ == "__main__":
    main(tyro.cli(Args))
