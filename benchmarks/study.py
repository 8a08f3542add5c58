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
  (within the limits) join the grid and the winner is re-picked, never a collapsing rate. `--tune-rounds N` is an
  emergency cap only: a grid it stops is flagged `"capped": true` and its edge winner `"edge": true`. In
  tuning.json `edge` means "could have been extended and was not": false for every winner of a finished tuning;
  `at_limit` marks a winner at a ladder limit. Rates are swept at each script's untuned knob (STUDY["knob"],
  passed explicitly); then, at the winning rate (coordinate-wise: the rate is not re-tuned), the knob of each
  script that declares one (ppo init_kl_coef 0.02, grpo beta 0.04, hypo kl_coef 0.03, best_of_n_neg beta 0.1) on
  the half-decade ladder around its untuned value (0.02: 0.0063, 0.02, 0.063, two significant digits), extended the
  same way until interior or at the limits 1e-4 and 10, then refined at x2 and /2, over the fixed budgets (a tie
  keeps the untuned value). Three economies that cannot change a winner: seeds run in the order 101, 102, 103 and a
  rate is not run on a later seed once an earlier one collapsed; a tuning run is stopped at its first collapsing
  evaluation; and the third seed runs only where it can change the winner: a rate whose two seeds did not collapse
  gets seed 103 when the larger of its two areas (the most its median of three can be) reaches the best score of
  the grid's complete rates (three seeds, none collapsed) less 1e-6, or, in a grid with no complete rate yet, when
  its smaller area is the grid's largest; repeated until no rate qualifies at the current budgets. tuning.json
  keeps every rate's per-seed areas and collapses (`"seeds": 2` where the third was not needed). It writes
  benchmarks/tuning.json (protocol 2) and prints the TASK_DEFAULTS rows it implies; the study passes each arm its
  tuned rate and knob from that file explicitly. A partial tuning (`--tune-scripts`, say a new script) writes
  OUT/tune/tuning.json only, at the budgets of an existing protocol-2 --tuning file if there is one; `--tune-merge`
  adds its methods to that file.
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
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["bandit_r1", "bandit_r2", "min_length", "mode_length", "skew_length"]
BANDITS = ("bandit_r1", "bandit_r2")
BATCH = 64  # responses per iteration of every arm (claim 7 varies it)
FULL = {t: 100 * BATCH if t in BANDITS else 60 * BATCH for t in TASKS}  # the full length, in responses
BEST = {t: 1.0 if t in BANDITS else 0.0 for t in TASKS}  # the highest gold reward a policy can reach
EVAL_SCHEDULE = {"eval-every": "10", "eval-dense-every": "2", "eval-dense-until": "30"}
COMPLETIONS = "4"  # C of every on-policy arm
SIZES7, MINIBATCH7 = [64, 128, 256, 512], 16  # claim 7: B at fixed M (every script's default M)
STEP_ROUND = max(SIZES7) // MINIBATCH7  # claim 7's budget is a whole iteration of its largest B: 32 gradient steps
FULL_STEPS = {t: math.ceil(FULL[t] // MINIBATCH7 / STEP_ROUND) * STEP_ROUND for t in TASKS}  # 416 and 256
OBJECTIVES = ["pref_ft", "dpo", "ipo", "hypo", "best_of_n", "best_of_n_neg", "rwr", "online_dpo", "online_ipo",
              "reinforce", "ppo", "grpo"]
VARIANTS = {"best_of_n": ["offline"], "rwr": ["offline"]}  # switches that make methods of their own, tuned on their own
LADDER = [float(f"{m}e{e}") for e in range(-8, 1) for m in (1, 3)]  # the half-decade learning-rate ladder
LR_START = {t: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] if t in BANDITS else [1e-5, 3e-5, 1e-4, 3e-4, 1e-3] for t in TASKS}
LR_LIMITS = (1e-6, 1e-1)
KL_KNOBS = {"ppo": ("init_kl_coef", [0.0063, 0.02, 0.063]), "grpo": ("beta", [0.013, 0.04, 0.13]),
            "hypo": ("kl_coef", [0.0095, 0.03, 0.095])}  # the untuned default (passed in the rate sweeps) and a half-decade either side
TUNING = ROOT / "benchmarks" / "tuning.json"


@dataclass
class Args:
    claims: list[int] = field(default_factory=lambda: list(range(1, 10)))
    """claims to run (1-9, docs/paper.md section 5)"""
    seeds: Optional[list[int]] = None
    """reporting seeds (default 1 2 3 4 5; 1 with --quick), e.g. --seeds 21 22 23"""
    quick: bool = False
    """one seed, full length halved, budgets a quarter of the full length unless --tuning exists: a smoke run"""
    out: Optional[str] = None
    """where runs and the report go (default runs/study, or runs/study_quick with --quick)"""
    figures: Optional[str] = None
    """where the figures (and a copy of report.md, report.json) go (default benchmarks/figures, or OUT/figures with --quick)"""
    workers: int = os.cpu_count() or 1
    """runs at a time (each uses one torch thread)"""
    max_iterations: Optional[int] = None
    """cap every run at this many iterations (for testing the pipeline)"""
    dry_run: bool = False
    """print what would run (runs, iterations, evaluations per script) and stop"""
    tuning: str = str(TUNING)
    """the tuning result: budgets, rates and KL strengths the study uses (--tune writes it)"""
    tune: bool = False
    """instead of the claims: tune rates (and KL strengths) on --tuning-seeds, derive the budgets, write --tuning"""
    tuning_seeds: list[int] = field(default_factory=lambda: [101, 102])
    """seeds of the tuning runs (disjoint from the reporting seeds)"""
    tune_scripts: list[str] = field(default_factory=list)
    """scripts to tune (default: every objective; a subset is written under OUT/tune only, not to --tuning)"""
    tune_tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to tune on"""
    tune_rates: list[float] = field(default_factory=list)
    """the starting grid of learning rates (default: LR_START of the task)"""
    tune_around_defaults: bool = False
    """start each grid at the script's current rate and the half-decade either side (3 rates, not 5: about 0.6x the runs)"""
    tune_limits: tuple[float, float] = LR_LIMITS
    """the grid is never extended beyond these rates"""
    tune_rounds: Optional[int] = None
    """at most this many rounds of learning-rate runs (the first grid, then one per extension); default: until every
    winner is interior. A capped tuning leaves some winners at an edge (`"edge": true` in --tuning)"""


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
    script, *flags = name.split()
    return arm(script, task, **{f.lstrip("-").replace("-", "_"): True for f in flags})


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
        flags = [s for k, v in self.options for s in ([f"--{k}"] + ([v] if v != "" else []))]
        return [sys.executable, str(ROOT / "algos" / f"{self.arm.script}.py"), "--task", self.arm.task, "--seed", str(self.seed), *flags]


def load_script(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def script_args(script):
    """The script's Args() with every default."""
    return load_script(script).Args()


def option(script, options: dict, name):
    """The value of --name among `options` (flag -> value strings), else the script's default."""
    return options.get(name.replace("_", "-"), getattr(script_args(script), name))


def responses_per_iteration(script, options: dict):
    """What `samples` grows by each iteration: 2 per offline pair, B (2 + k) for HyPO, B completions otherwise."""
    b = int(option(script, options, "batch_size"))
    if script == "hypo":
        return b * (2 + int(option(script, options, "num_online_samples")))
    return 2 * b if script in ("pref_ft", "dpo", "ipo") else b


def steps_per_iteration(script, options: dict):
    """Nominal gradient steps per iteration: B / M minibatches, T passes."""
    return int(option(script, options, "batch_size")) // int(option(script, options, "minibatch_size")) * int(
        option(script, options, "update_epochs"))


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
    """The metrics rows of a finished run (the newest run directory the script wrote), or the toy's JSON."""
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    files = sorted((run_dir / "runs").glob("*/metrics.jsonl"))
    return [json.loads(line) for line in open(files[-1])] if files else None


class Launcher:
    """Runs what is not done yet, `workers` at a time, with a progress bar; results are read back from disk."""

    def __init__(self, out: Path, workers: int):
        self.out, self.workers, self.failed = out, workers, {}

    def done(self, run):
        return (self.out / run.key / "done.json").exists()

    def launch(self, runs):
        from tqdm.auto import tqdm

        todo = [r for r in dict.fromkeys(runs) if script_exists(r.arm.script) and not self.done(r)]
        if not todo:
            return
        print(f"{len(todo)} runs to do, {self.workers} at a time ({len(set(runs)) - len(todo)} done or missing)", flush=True)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, tqdm(total=len(todo), desc="runs", unit="run") as bar:
            futures = {pool.submit(self.execute, r): r for r in todo}
            for future in concurrent.futures.as_completed(futures):
                bar.update(1)
                if future.result():
                    self.failed[futures[future].key] = future.result()
                    bar.write(f"FAILED {futures[future].key}:\n{future.result()}")

    def execute(self, run):
        """Run one configuration from scratch in its directory; None on success, else the error text."""
        d = self.out / run.key
        shutil.rmtree(d, ignore_errors=True)  # a killed run left a partial directory: start it over
        try:
            d.mkdir(parents=True)
            start = time.time()
            with open(d / "stdout.txt", "w") as stdout, open(d / "stderr.txt", "w") as stderr:
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
                code = subprocess.run(run.command(), cwd=d, stdout=stdout, stderr=stderr, env=env).returncode
            if code != 0:
                tail = (d / "stderr.txt").read_text().strip().splitlines()[-8:]
                return f"  exit {code}: " + " ".join(run.command()[1:]) + "\n  " + "\n  ".join(tail)
            (d / "done.json").write_text(json.dumps({"wall_s": round(time.time() - start, 1), "command": run.command()[1:]}))
        except OSError as err:
            return f"  cannot write under {d}: {err} (disk full?). Finished runs are kept; rerun the same command to resume."
        return None

    def wall(self, runs):
        """Seconds the finished runs took, one after another."""
        return sum(json.loads((self.out / r.key / "done.json").read_text()).get("wall_s", 0.0) for r in set(runs) if self.done(r))


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


def area(x, y, budget):
    """The mean of the piecewise-linear curve (x, y) over [0, budget] (trapezoid). Only a run capped by
    --max-iterations (a pipeline test) ends before its budget: its last value is then held."""
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


def budget_rule(reaches: dict, unit, full):
    """The budget from {config: [its runs' reach of 90%, one per tuning seed]}: twice the least median, rounded up
    to a whole `unit`, at most `full` (`full` when no median is finite). Returns (budget, config, its median)."""
    medians = {c: float(np.median(v)) for c, v in reaches.items() if len(v)}
    finite = {c: m for c, m in medians.items() if np.isfinite(m)}
    if not finite:
        return full, None, math.inf
    fastest = min(finite, key=lambda c: (finite[c], str(c)))
    return min(full, math.ceil(2 * finite[fastest] / unit) * unit), fastest, finite[fastest]


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
    """Arms ranked by mean, best first: [{name, mean, ci90, rank, top}]. Equal means share a rank; the top group is
    the best arm and every arm whose interval reaches the best one's (its upper end >= the best's lower end)."""
    stats = {n: bootstrap(v) for n, v in values.items()}
    order = sorted(values, key=lambda n: -stats[n][0])
    best_lo = stats[order[0]][1][0]
    return [{"name": n, "mean": stats[n][0], "ci90": stats[n][1], "rank": 1 + sum(stats[m][0] > stats[n][0] for m in values),
             "top": n == order[0] or stats[n][1][1] >= best_lo} for n in order]


@dataclass
class Check:
    """One prediction: a difference per seed, positive where the claim says so; `ranked` decides it by the top group."""

    name: str
    metric: str
    diffs: list
    ranked: Optional[str] = None  # the outcome of a top-group check (see top_check)

    def result(self):
        mean, ci = bootstrap(self.diffs)
        return {"name": self.name, "metric": self.metric, "mean_diff": mean, "ci90": ci, "outcome": self.ranked or outcome(ci)}


def top_check(name, metric, values: dict, group):
    """"One of `group` is best or fastest": holds when the better of them (by mean) is in the top group and some arm is
    not, fails when it is not in it, inconclusive when every arm is. The difference: it minus the best arm outside `group`."""
    ranks = {r["name"]: r for r in ranking(values)}
    mine = max(group, key=lambda n: ranks[n]["mean"])
    other = max((n for n in values if n not in group), key=lambda n: ranks[n]["mean"])
    result = "inconclusive" if all(r["top"] for r in ranks.values()) else "holds" if ranks[mine]["top"] else "fails"
    return Check(f"{name}: {mine} in the top group (best other: {other})", metric, list(np.subtract(values[mine], values[other])), result)


def fmt(values, digits=3):
    mean, (lo, hi) = bootstrap(values)
    return f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


class Results:
    """The runs of a claim's arms over seeds, read back from disk, and their metrics (one value per seed)."""

    def __init__(self, out: Path, runs_of: Callable, budgets: dict):
        self.out, self.runs_of, self.budgets = out, runs_of, budgets

    @functools.lru_cache(maxsize=None)
    def rows(self, a: Arm):
        return [read_rows(self.out / r.key) for r in self.runs_of(a)]

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
        return [float(np.interp(self.budgets[a.task][x], cx, cy)) for cx, cy in self.curves(a, key, x)]

    def reach(self, a: Arm, level, x="samples"):
        """Responses (or steps) to `level` of the room, censored at the budget (reported as the budget)."""
        return [min(reach(cx, cy, level), self.budgets[a.task][x]) for cx, cy in self.curves(a, x=x, norm=True)]

    def final(self, a: Arm, key="eval/gold_reward"):
        return [final(rows, key) for rows in self.rows(a)]

    def summary(self, a: Arm, x="samples"):
        b = self.budgets[a.task][x]
        unit = "responses" if x == "samples" else "steps"
        return (f"{a.task:12s} {a.name:22s} area {fmt(self.area(a, x))}   gold at the budget {fmt(self.at_budget(a, x))}   "
                f"{unit} to 50% {fmt(self.reach(a, 0.5, x), 4)}, to 90% {fmt(self.reach(a, 0.9, x), 4)} (censored at {b})")


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


def ranked_chart(ax, values: dict, title, highlight=()):
    """Each arm's mean with its 90% interval, best first; the top group in full colour, the best arm's interval shaded."""
    ranks = ranking(values)
    for i, r in enumerate(ranks):
        color = "tab:red" if r["name"] in highlight else "tab:blue"
        ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["ci90"][0]], [r["ci90"][1] - r["mean"]]], fmt="o", capsize=3, color=color,
                    alpha=1.0 if r["top"] else 0.35)
    ax.axvspan(*ranks[0]["ci90"], color="gold", alpha=0.25, lw=0)
    ax.set_yticks(range(len(ranks)), [f"{r['rank']}. {r['name']}" + (" *" if r["top"] else "") for r in ranks])
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


def claims():
    """The nine experiments, each check quoting the words it tests."""
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
                checks.append(Check(f'{u}: "on-policy methods beat their offline counterparts": {on} > {off}', AREA, list(gap(res, on, off, u))))
                checks.append(Check(f'"the gap shrinks or vanishes" where the peak is likely: {on} - {off} smaller on {likely} than on {u}',
                                    AREA, list(gap(res, on, off, u) - gap(res, on, off, likely))))
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
                                f'data": {on} > {off}', AREA, list(d)))
            checks.append(Check(f'"most clearly under poor coverage (Skew Length)": {on} - {off} larger on skew_length than on min_length',
                                AREA, list(d - gap(res, on, off, "min_length"))))
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
                                        list(np.subtract(res.area(arm_of(n, t)), res.area(arm_of(m, t))))))
            checks.append(Check(f'{t}: "BoN + negative gradient beats plain BoN": best_of_n_neg > best_of_n', AREA,
                                list(np.subtract(res.area(arm_of("best_of_n_neg", t)), res.area(arm_of("best_of_n", t))))))
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
                                "full-length final (last five iterations) minus the first iteration", list(np.subtract(dpo, pref_ft))))
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
    methods5 = OBJECTIVES[:5] + ["best_of_n --offline"] + OBJECTIVES[5:7] + ["rwr --offline"] + OBJECTIVES[7:]
    group5 = ("online_dpo", "online_ipo")

    def judge5(res):
        lines, checks = [], []
        for t in TASKS:
            values = {n: res.area(arm_of(n, t)) for n in methods5}
            lines.append(f"{t}: " + ", ".join(f"{r['rank']}. {r['name']} {r['mean']:.3f} [{r['ci90'][0]:.3f}, {r['ci90'][1]:.3f}]"
                                              + ("*" if r["top"] else "") for r in ranking(values)))
            checks.append(top_check(f'{t}: "on-policy + negative gradient (online DPO/IPO) is best or fastest"', AREA, values, group5))
            for other in ("dpo", "best_of_n"):
                checks.append(Check(f'{t}: "Complementary": online_dpo > {other}', AREA, list(np.subtract(values["online_dpo"], values[other]))))
        lines += ["(rank. arm, mean area [90% interval], * the top group)", "",
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
            ranked_chart(ax, {n: res.area(arm_of(n, t)) for n in methods5}, f"{t} (budget {res.budgets[t]['samples']} responses)", group5)
            ax.set_xlabel("area (share of the room above pi_ref)")
        fig.suptitle("Claim 5: every method's area over the budget, mean and 90% interval over seeds; * the top group "
                     "(shaded: the best arm's interval), red: online DPO / IPO")
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
            checks.append(Check(f'bandit_r1: "a little helps (T = 2 > T = 1 in the bandit)": {m}', AREA, list(area6[m, 2] - area6[m, 1])))
        for m in nonrl6:
            checks.append(Check(f'bandit_r1: "much hurts non-RL methods": {m} T = 8 < T = 2', AREA, list(area6[m, 2] - area6[m, 8])))
        for m in nonrl6:
            checks.append(Check(f'bandit_r1: "PPO tolerates it best": ppo loses less than {m} from T = 2 to T = 8', AREA,
                                list((area6[m, 2] - area6[m, 8]) - (area6["ppo", 2] - area6["ppo", 8]))))
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

    def arm7(t, b):  # M = 16 is every script's default; evaluated every 2 iterations (every one at B = 512) all along
        return arm("online_dpo", t, f"online_dpo B={b}", batch_size=b, eval_dense_every=1 if b == 512 else 2, eval_dense_until=10 ** 6)

    def judge7(res):
        lines = [res.summary(arm7(t, b), "steps") for t in tasks7 for b in SIZES7]
        lines.append(f"the checks compare areas on the evaluations every arm shares, every {STEP_ROUND} gradient steps (B = 512's iterations)")
        d = {t: np.subtract(*(res.area(arm7(t, b), "steps", grid=STEP_ROUND) for b in (64, 512))) for t in tasks7}
        metric = f"{AREA_STEPS}, evaluations every {STEP_ROUND} steps"
        checks = [Check('min_length: "Fresher data (smaller B at fixed M) gives more reward per gradient step on Min Length": B = 64 > B = 512',
                        metric, list(d["min_length"])),
                  Check('"little difference on Mode Length": B = 64 - B = 512 smaller on mode_length than on min_length', metric,
                        list(d["min_length"] - d["mode_length"]))]
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
        spec = importlib.util.spec_from_file_location("mode_seeking", ROOT / "benchmarks" / "mode_seeking.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.plot(res.rows(toy)[0], path)

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
                                "full-length final eval/kl_ref: dpo / 2 - hypo", list(kd / 2 - kh)))
            checks.append(Check(f'{t}: "at equal or better reward": hypo\'s gold not below dpo\'s by more than 5% of the room',
                                "full-length final gold, (hypo - dpo) / room + 0.05", list((gh - gd) / room + 0.05)))
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
    """The tuning file's name of an arm's method: its script and switches ("best_of_n --offline")."""
    return " ".join([a.script] + [f"--{k}" for k, v in a.options if v == "" and k in VARIANTS.get(a.script, [])])


def tuned_options(a: Arm, tuning):
    """The tuned learning rate and KL strength of `a`'s method on its task, from the tuning file (none without one)."""
    if tuning is None or a.script == "mode_seeking":
        return ()
    entry = tuning["scripts"].get(name_of(a), {}).get(a.task)
    if entry is None or entry["learning_rate"] is None:
        raise SystemExit(f"{tuning['path']} has no tuned values for {name_of(a)} on {a.task}: rerun --tune with every script and task")
    opts = [("learning-rate", f"{entry['learning_rate']:g}")]
    if a.script in KL_KNOBS:
        knob = KL_KNOBS[a.script][0]
        opts.append((knob.replace("_", "-"), f"{entry[knob]:g}"))
    return tuple(opts)


def read_tuning(path):
    """The tuning file, or None where there is none; a one-line error where it cannot be read."""
    if not Path(path).exists():
        return None
    try:
        tuning = json.loads(Path(path).read_text())
        tuning["budgets"], tuning["scripts"]  # noqa: B018
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"--tuning {path}: not a tuning result ({err!r}); rerun `python benchmarks/study.py --tune`") from None
    return tuning | {"path": str(path)}


def budgets_for(tasks, tuning, quick, max_iterations):
    """{task: {"samples": budget, "steps": budget, "full": length}}: from the tuning file, else (only --quick, tests)
    a quarter of the full length and of its gradient steps. --quick halves the full length."""
    out = {}
    for t in tasks:
        full = FULL[t] // (2 if quick else 1)
        if tuning is not None:
            b = tuning["budgets"].get(t)
            if b is None:
                raise SystemExit(f"{tuning['path']} has no budget for {t}: rerun --tune on every task")
            out[t] = {"samples": min(b["samples"], full), "steps": b["steps"], "full": full}
        else:
            out[t] = {"samples": FULL[t] // 4, "steps": FULL_STEPS[t] // 4, "full": full}
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


def dry_run(runs, label):
    """Print the runs, iterations and evaluations per script (what --dry-run shows)."""
    per = {}
    for r in set(runs):
        if r.arm.script == "mode_seeking":
            continue
        n, opts = r.iterations, dict(r.options)
        dense, every = int(opts["eval-dense-until"]), int(opts["eval-every"])
        evals = len({0, n} | set(range(0, min(n, dense) + 1, int(opts["eval-dense-every"]))) | set(range(0, n + 1, every)))
        s = per.setdefault(r.arm.script, [0, 0, 0, 0])
        s[0], s[1], s[2], s[3] = s[0] + 1, s[1] + n, s[2] + evals, s[3] + n * responses_per_iteration(r.arm.script, opts)
    print(f"{label}: {sum(s[0] for s in per.values())} runs")
    print("| script | runs | iterations | evaluations | responses |\n|---|---|---|---|---|")
    for script, s in sorted(per.items()):
        print(f"| {script} | " + " | ".join(str(v) for v in s) + " |")


def prebuild(tasks):
    """Build every task's cache once, in this process and with progress, before runs race to build it."""
    sys.path.insert(0, str(ROOT))
    from tasks import make_task

    for t in tasks:
        make_task(t)


def validate_report(report):
    """The problems of a report.json against its schema (an empty list: it conforms)."""
    problems = [f"missing {k}" for k in ("seeds", "tuning_seeds", "wall_s", "workers", "claims") if k not in report]
    for number, c in report.get("claims", {}).items():
        if c.get("verdict") not in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE") or not c.get("checks"):
            problems.append(f"claim {number}: verdict {c.get('verdict')!r}, {len(c.get('checks', []))} checks")
        for ch in c.get("checks", []):
            if set(ch) != {"name", "metric", "mean_diff", "ci90", "outcome"} or ch["outcome"] not in ("holds", "fails", "inconclusive") \
                    or len(ch["ci90"]) != 2 or not ch["ci90"][0] <= ch["ci90"][1]:
                problems.append(f"claim {number}: malformed check {ch}")
        if c.get("checks") and c["verdict"] != verdict([ch["outcome"] for ch in c["checks"]]):
            problems.append(f"claim {number}: verdict {c['verdict']} does not follow from its checks")
    return problems


def run_claims(args: Args, out: Path, figures: Path):
    all_claims = claims()
    unknown = [c for c in args.claims if c not in all_claims]
    if unknown:
        raise SystemExit(f"unknown claim ids {unknown}: choose among {sorted(all_claims)}")
    tuning = read_tuning(args.tuning)
    if tuning is None and not args.quick:
        raise SystemExit(f"--tuning {args.tuning} does not exist: run `python benchmarks/study.py --tune` first (or pass --quick)")
    seeds = args.seeds or ([1] if args.quick else [1, 2, 3, 4, 5])
    chosen = [all_claims[c] for c in args.claims]
    budgets = budgets_for(TASKS, tuning, args.quick, args.max_iterations)
    runs_of = plan(chosen, seeds, budgets, tuning, args.max_iterations)
    runs = [r for rs in runs_of.values() for r in rs]
    if args.dry_run:
        return dry_run(runs, f"claims {args.claims}, seeds {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    prebuild(sorted({r.arm.task for r in runs if r.arm.task in TASKS and script_exists(r.arm.script)}))
    launcher, start = Launcher(out, args.workers), time.time()
    launcher.launch(runs)
    sections, summary, report = [], [], {}
    for c in chosen:
        mine = [r for a, _ in c.arms for r in runs_of[c.number, a]]
        missing = sorted({r.arm.script for r in mine if not script_exists(r.arm.script)})
        failed = [r.key for r in mine if script_exists(r.arm.script) and not launcher.done(r)]
        lines, checks = [], []
        if missing:
            result, lines = "MISSING", [f"scripts not in algos/ yet: {', '.join(missing)}"]
        elif failed:
            result = "FAILED"
            lines = [f"run failed: {k}" + (f"\n{launcher.failed[k]}" if k in launcher.failed else " (see its stderr.txt)")
                     for k in dict.fromkeys(failed)]
        else:
            res = Results(out, lambda a, n=c.number: runs_of[n, a], budgets)
            lines, checks = c.judge(res)
            checks = [ch.result() for ch in checks]
            result = verdict([ch["outcome"] for ch in checks])
            report[str(c.number)] = {"verdict": result, "checks": checks}
            c.plot(res, figures / f"claim{c.number}.png")
        sections.append(f"\n## Claim {c.number}: {result}\n> {c.words}\n\n" +
                        "".join(f"- **{ch['outcome']}** {ch['name']}: {ch['mean_diff']:+.4g} [{ch['ci90'][0]:+.4g}, {ch['ci90'][1]:+.4g}] "
                                f"({ch['metric']})\n" for ch in checks) +
                        "\n```\n" + "\n".join(lines) + "\n```\n" + (f"![claim {c.number}](claim{c.number}.png)\n" if checks else ""))
        summary.append({"claim": c.number, "verdict": result, "checks": checks, "numbers": lines})
    wall = time.time() - start
    report = {"seeds": seeds, "tuning_seeds": tuning["tuning_seeds"] if tuning else [], "wall_s": round(wall, 1), "workers": args.workers,
              "claims": report}
    assert not validate_report(report), validate_report(report)
    shown = tuning and (Path(tuning["path"]).resolve().relative_to(ROOT) if Path(tuning["path"]).resolve().is_relative_to(ROOT) else tuning["path"])
    source = f"budgets, rates and KL strengths from {shown} (tuning seeds {tuning['tuning_seeds']})" if tuning else \
        "no tuning file: budgets a quarter of the full length, the scripts' default rates (--quick)"
    if tuning and set(seeds) & set(tuning["tuning_seeds"]):
        source += f"; WARNING: seeds {sorted(set(seeds) & set(tuning['tuning_seeds']))} were also tuned on"
    header = (f"# cleanpref study: {len(chosen)} claims, seeds {seeds}{' (quick: not the result)' if args.quick else ''}\n\n"
              f"{len(set(runs))} runs; this invocation {wall / 60:.1f} min at {args.workers} workers (the runs alone: "
              f"{launcher.wall(runs) / 60:.1f} min one after another); {source}.\n"
              "Budgets (responses; claim 7 in gradient steps): " +
              ", ".join(f"{t} {b['samples']} ({b['steps']} steps)" for t, b in budgets.items()) +
              ". Intervals: 90% bootstrap over seeds of the mean paired difference (issue 19; the protocol is study.py's docstring).\n")
    counts = [" / ".join(str(sum(ch["outcome"] == o for ch in s["checks"])) for o in ("holds", "fails", "inconclusive")) for s in summary]
    table = "\n| claim | verdict | holds / fails / inconclusive |\n|---|---|---|\n" + "\n".join(
        f"| {s['claim']} | {s['verdict']} | {n} |" for s, n in zip(summary, counts))
    text = header + table + "\n" + "".join(sections)
    print(text)
    try:
        for d in [out] + ([figures] if figures != out else []):
            d.mkdir(parents=True, exist_ok=True)
            (d / "report.md").write_text(text)
            (d / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    except OSError as err:
        raise SystemExit(f"cannot write the report under {out}: {err} (disk full?); the runs are kept, rerun to resume") from None
    print(f"report: {out / 'report.md'}, {out / 'report.json'}; figures: {figures}/")
    return summary


# ------------------------------------------------------------------------------------------- tuning
def neighbour(rate, direction):
    """The next rate on the half-decade ladder, up (+1) or down (-1)."""
    i = min(range(len(LADDER)), key=lambda j: abs(math.log(LADDER[j] / rate)))
    return LADDER[i + direction]


def pick(scores: dict, prefer=None):
    """The key with the best score (NaN: a failed run, never picked); scores within 1e-6 tie: `prefer` wins a tie
    if it is among them, else the smallest key."""
    finite = {k: s for k, s in scores.items() if np.isfinite(s)}
    if not finite:
        return None
    top = max(finite.values())
    tied = sorted(k for k, s in finite.items() if s >= top - 1e-6)
    return prefer if prefer in tied else tied[0]


def around(method, task):
    """The method's current rate on `task` (TASK_DEFAULTS, or OFFLINE_LEARNING_RATES with --offline) and its ladder neighbours."""
    module = load_script(method.split()[0])
    lr = module.OFFLINE_LEARNING_RATES[task] if "--offline" in method else module.TASK_DEFAULTS[task]["learning_rate"]
    return [neighbour(lr, -1), neighbour(lr, 0), neighbour(lr, +1)]


def extend(grid, winner, limits):
    """The grid with the next rate beyond an edge winner (within limits), or None where the winner needs none."""
    if winner == grid[0] and neighbour(winner, -1) >= limits[0] * (1 - 1e-9):
        return [neighbour(winner, -1)] + grid
    if winner == grid[-1] and neighbour(winner, +1) <= limits[1] * (1 + 1e-9):
        return grid + [neighbour(winner, +1)]
    return None


def run_tune(args: Args, out: Path):
    scripts = args.tune_scripts or OBJECTIVES
    bad = [s for s in scripts if not script_exists(s)] + [t for t in args.tune_tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"--tune-scripts / --tune-tasks: no such script or task {bad}; choose among {OBJECTIVES} and {TASKS}")
    methods = [" ".join([s] + [f"--{v}" for v in vs]) for s in scripts for vs in [[]] + [[v] for v in VARIANTS.get(s, [])]]
    tasks, seeds = args.tune_tasks, args.tuning_seeds
    full = {t: min(FULL[t], args.max_iterations * BATCH) if args.max_iterations else FULL[t] for t in tasks}
    full_steps = {t: min(FULL_STEPS[t], math.ceil(full[t] / MINIBATCH7 / STEP_ROUND) * STEP_ROUND) for t in tasks}
    launcher, start = Launcher(out, args.workers), time.time()
    grid = {(m, t): sorted(args.tune_rates or (around(m, t) if args.tune_around_defaults else LR_START[t])) for m in methods for t in tasks}
    runs = {}  # (method, task, rate, kl strength or None) -> [run per seed]

    def tuning_arm(m, t, lr, kl=None):
        a = arm_of(m, t)
        kl = KL_KNOBS[a.script][1][1] if kl is None and a.script in KL_KNOBS else kl  # the rates are swept at the untuned KL
        extra = (("learning-rate", f"{lr:g}"),) + (((KL_KNOBS[a.script][0].replace("_", "-"), f"{kl:g}"),) if kl is not None else ())
        return Arm(a.script, t, a.options + extra)

    def want(m, t, lr, kl=None):
        if (m, t, lr, kl) not in runs:
            runs[m, t, lr, kl] = [make_run(tuning_arm(m, t, lr, kl), s, full[t], "samples", (), args.max_iterations) for s in seeds]

    def curves(rs, scale_to_steps=False):  # normalised, against responses or gradient steps; None for a run not done
        out_ = []
        for r in rs:
            rows, opts = read_rows(out / r.key) if launcher.done(r) else None, dict(r.options)
            s = steps_per_iteration(r.arm.script, opts) / responses_per_iteration(r.arm.script, opts) if scale_to_steps else 1.0
            out_.append(normalised(rows, BEST[r.arm.task], s) if rows else None)
        return out_

    def budgets_now():
        result = {}
        for t in tasks:
            reach_s, reach_k = {}, {}
            for (m, tt, lr, kl), rs in runs.items():
                if tt == t and kl is None:
                    reach_s[m, lr] = [reach(*c, 0.9) for c in curves(rs) if c is not None]
                    reach_k[m, lr] = [reach(*c, 0.9) for c in curves(rs, True) if c is not None]
            b, fastest, median = budget_rule(reach_s, BATCH, full[t])
            bk, fastest_k, median_k = budget_rule(reach_k, STEP_ROUND, full_steps[t])
            result[t] = {"samples": b, "reach90": median if fastest else None, "fastest": f"{fastest[0]} lr {fastest[1]:g}" if fastest else None,
                         "steps": bk, "reach90_steps": median_k if fastest_k else None,
                         "fastest_steps": f"{fastest_k[0]} lr {fastest_k[1]:g}" if fastest_k else None}
        return result

    def score(rs, budget):
        cs = curves(rs)
        return float(np.mean([area(*c, budget) for c in cs])) if all(c is not None for c in cs) else math.nan

    if args.dry_run:
        for (m, t), lrs in grid.items():
            for lr in lrs:
                want(m, t, lr)
        kl = sum(len(KL_KNOBS[m][1]) - 1 for m, t in grid if m in KL_KNOBS) * len(seeds)
        return dry_run([r for rs in runs.values() for r in rs], f"tuning, first round (then {kl} KL runs and any grid extensions)")
    prebuild(tasks)
    rounds = 0
    while True:  # learning rates: run the grids, derive the budgets, score, extend the grids past edge winners
        rounds += 1
        for (m, t), lrs in grid.items():
            for lr in lrs:
                want(m, t, lr)
        launcher.launch([r for rs in runs.values() for r in rs])
        budgets = budgets_now()
        scores = {(m, t): {lr: score(runs[m, t, lr, None], budgets[t]["samples"]) for lr in lrs} for (m, t), lrs in grid.items()}
        winners = {k: pick(s) for k, s in scores.items()}
        grown = {k: extend(grid[k], w, args.tune_limits) for k, w in winners.items() if w is not None}
        grown = {k: g for k, g in grown.items() if g}
        if not grown or rounds == args.tune_rounds:
            break
        print(f"round {rounds}: extending {len(grown)} grids past their edge winners: " + ", ".join(f"{m} on {t}" for m, t in grown))
        grid |= grown

    kl_scores, kl_winners = {}, {}  # then the KL strength at each winning rate, over the same budgets
    for (m, t), lr in winners.items():
        if m in KL_KNOBS and lr is not None:
            for kl in KL_KNOBS[m][1]:
                if kl != KL_KNOBS[m][1][1]:
                    want(m, t, lr, kl)
    launcher.launch([r for rs in runs.values() for r in rs])
    for (m, t), lr in winners.items():
        if m in KL_KNOBS and lr is not None:
            knob, values = KL_KNOBS[m]
            default = values[1]
            kl_scores[m, t] = {kl: scores[m, t][lr] if kl == default else score(runs[m, t, lr, kl], budgets[t]["samples"]) for kl in values}
            kl_winners[m, t] = pick(kl_scores[m, t], prefer=default)

    result = {"command": "python benchmarks/study.py " + " ".join(sys.argv[1:]), "tuning_seeds": seeds, "tasks": tasks,
              "wall_s": round(time.time() - start, 1), "workers": args.workers, "runs": sum(len(rs) for rs in runs.values()),
              "runs_s": round(launcher.wall([r for rs in runs.values() for r in rs]), 1), "rounds": rounds,
              "edges_left": sum(lr is not None and lr in (grid[k][0], grid[k][-1]) for k, lr in winners.items()),
              "protocol": "area over the task's budget (normalised gold, trapezoid), mean over the tuning seeds; budgets by the rule in "
                          "benchmarks/study.py's docstring; half-decade rates extended past edge winners; KL strength on 3 points at the "
                          "winning rate",
              "budgets": budgets, "scripts": {}}
    for (m, t), lr in winners.items():
        entry = {"learning_rate": lr, "scores": {f"{k:g}": v if np.isfinite(v) else None for k, v in scores[m, t].items()},
                 "edge": lr is not None and lr in (grid[m, t][0], grid[m, t][-1])}
        if (m, t) in kl_winners:
            knob = KL_KNOBS[m][0]
            entry |= {knob: kl_winners[m, t], f"{knob}_scores": {f"{k:g}": v if np.isfinite(v) else None for k, v in kl_scores[m, t].items()},
                      f"{knob}_edge": kl_winners[m, t] in (KL_KNOBS[m][1][0], KL_KNOBS[m][1][-1])}
        result["scripts"].setdefault(m, {})[t] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(result, indent=1) + "\n")
    complete = set(methods) == {" ".join([s] + [f"--{v}" for v in vs]) for s in OBJECTIVES for vs in [[]] + [[v] for v in VARIANTS.get(s, [])]}
    complete &= set(tasks) == set(TASKS) and not args.max_iterations
    if complete:
        Path(args.tuning).write_text(json.dumps(result, indent=1) + "\n")
    print_tuning(result)
    print(f"\ntuning: {out / 'tuning.json'}" + (f" and {args.tuning}" if complete else
                                                  f" only (a partial tuning; the study reads it with --tuning {out / 'tuning.json'})"))
    return result


def print_tuning(result):
    """The budgets, every score and winner, and the TASK_DEFAULTS rows the tuning implies (to paste into the scripts)."""
    print("\nbudgets (responses; gradient steps for claim 7), from the fastest curve's median responses to 90% of the room:")
    for t, b in result["budgets"].items():
        print(f"  {t}: {b['samples']} (fastest to 90%: {b['fastest'] or 'none, the full length'}, {b['reach90'] or math.inf:.0f}); "
              f"{b['steps']} steps (fastest: {b['fastest_steps'] or 'none'}, {b['reach90_steps'] or math.inf:.0f})")
    for m, per_task in result["scripts"].items():
        script, offline = m.split()[0], "--offline" in m
        print(f"\n{m}: area over the budget, mean over seeds {result['tuning_seeds']}")
        for t, e in per_task.items():
            kl = next((k for k in e if k.endswith("_scores") and k != "scores"), None)
            print(f"  {t}: " + ", ".join(f"{lr}: {s if s is None else round(s, 3)}" for lr, s in e["scores"].items()) +
                  f" -> {e['learning_rate']}" + (" (EDGE)" if e["edge"] else "") +
                  (f"; {kl[:-7]} " + ", ".join(f"{k}: {s if s is None else round(s, 3)}" for k, s in e[kl].items()) +
                                                      f" -> {e[kl[:-7]]}" if kl else ""))
        rows = {t: e for t, e in per_task.items() if e["learning_rate"] is not None}
        if offline:
            print(f"{script}.py: OFFLINE_LEARNING_RATES = dict(" + ", ".join(f"{t}={e['learning_rate']:g}" for t, e in rows.items()) + ")")
            continue
        print(f"{script}.py (num_iterations: the full length in responses; {result['command']}):\nTASK_DEFAULTS = {{")
        for t, e in rows.items():
            iterations = math.ceil(FULL[t] / responses_per_iteration(script, {}))
            kl = f", {KL_KNOBS[script][0]}={e[KL_KNOBS[script][0]]:g}" if script in KL_KNOBS else ""
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
