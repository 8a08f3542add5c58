"""The study in one command: the nine claims of PAPER.md section 5, measured on the embedded tasks, with figures.

    python benchmarks/study.py                     # all claims, 3 seeds, figures in benchmarks/figures/
    python benchmarks/study.py --quick             # one seed, shorter runs: the whole set in about 10 minutes
    python benchmarks/study.py --claims 1 3 --seeds 5 --out runs/my_study
    python benchmarks/study.py --tune --tune-scripts dpo ipo    # re-derive TASK_DEFAULTS' learning rates

Each claim is an experiment: arms (a script, a task, its options), seeds, the metric compared and the
ordering the study predicts, written as checks. Runs are subprocesses (one torch thread each,
`--workers` at a time), each in its own directory `--out/<task>__<script>__<options>__s<seed>/`; a run
whose directory holds `done.json` is never run again, so a killed study resumes where it stopped and
claims share their runs. The report gives, per claim, every compared number as mean +- std over seeds,
each check, and a verdict: HOLDS (every check passes), DOES NOT HOLD, MISSING (a script it needs does
not exist yet) or FAILED (a run failed; its stderr tail is shown, the other runs go on).

The protocol, the same for every claim:
- every method runs at its tuned per-task defaults (`TASK_DEFAULTS` in each script; `--tune` re-derives
  the learning rates by the protocol below), with the same seeds and the same evaluation prompts;
- within a claim, equal sample budgets: every arm on a task gets the same `--batch-size` (64) and
  `--num-iterations` (100 on the bandits, 60 on the length tasks; --quick halves them), unless the claim
  varies exactly that knob (claims 6 and 7);
- "final" = the mean of a run's last two evaluations of `eval/gold_reward` (or of the metric named);
  training statistics (claim 4) average the last five iterations;
- `--tune`: learning rates {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} on the bandits and {1e-5, 3e-5, 1e-4, 3e-4, 1e-3}
  on the length tasks, seed 1, default budget; the best "final" gold reward wins, ties the smaller rate.
"""

import concurrent.futures
import importlib.util
import json
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
ITERATIONS = {t: 100 if t in BANDITS else 60 for t in TASKS}
BEST = {t: 1.0 if t in BANDITS else 0.0 for t in TASKS}  # the highest gold reward a policy can reach
LR_GRID = {t: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] if t in BANDITS else [1e-5, 3e-5, 1e-4, 3e-4, 1e-3] for t in TASKS}
OBJECTIVES = ["pref_ft", "dpo", "ipo", "hypo", "best_of_n", "best_of_n_neg", "rwr", "online_dpo", "online_ipo",
              "reinforce", "ppo", "grpo"]
VARIANTS = {"best_of_n": [("offline",)], "rwr": [("offline",)]}  # options that are methods of their own, tuned on their own


@dataclass
class Args:
    claims: list[int] = field(default_factory=lambda: list(range(1, 10)))
    """claims to run (1-9, PAPER.md section 5)"""
    seeds: int = 3
    """seeds per arm (1, 2, ..., seeds)"""
    quick: bool = False
    """one seed and half the iterations: the whole set in about 10 minutes (a smoke run, not the result)"""
    out: Optional[str] = None
    """where runs and the report go (default runs/study, or runs/study_quick with --quick)"""
    figures: Optional[str] = None
    """where the figures go (default benchmarks/figures, or OUT/figures with --quick)"""
    workers: int = os.cpu_count() or 1
    """runs at a time (each uses one torch thread)"""
    max_iterations: Optional[int] = None
    """cap every run at this many iterations (for testing the pipeline)"""
    tune: bool = False
    """instead of the claims: the learning-rate grid for --tune-scripts on --tune-tasks, and the TASK_DEFAULTS it implies"""
    tune_scripts: list[str] = field(default_factory=list)
    """scripts to tune (default: every objective in algos/)"""
    tune_tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to tune on"""


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


@dataclass(frozen=True)
class Run:
    """An arm at one seed, with every option the study passes (its equal budget, then the arm's own)."""

    arm: Arm
    seed: int
    options: tuple

    @property
    def key(self):
        slug = "_".join(k + (f"={v}" if v != "" else "") for k, v in sorted(self.options)) or "default"
        return f"{self.arm.task}__{self.arm.script}__{slug}__s{self.seed}"

    def command(self):
        if self.arm.script == "mode_seeking":  # claim 8's toy: its own small script, no task
            return [sys.executable, str(ROOT / "benchmarks" / "mode_seeking.py"), "--json", "result.json", "--figure", "None"]
        flags = [s for k, v in self.options for s in ([f"--{k}"] + ([v] if v != "" else []))]
        return [sys.executable, str(ROOT / "algos" / f"{self.arm.script}.py"), "--task", self.arm.task, "--seed", str(self.seed), *flags]


def make_run(a: Arm, seed, budget, max_iterations=None):
    """The arm's options over the budget's; --max-iterations caps the iterations (and the eval cadence with them)."""
    opts = dict(budget) | dict(a.options)
    if max_iterations and "num-iterations" in opts:
        opts["num-iterations"] = str(min(int(opts["num-iterations"]), max_iterations))
        opts["eval-every"] = str(min(int(opts.get("eval-every", 10)), max(1, int(opts["num-iterations"]) // 2)))
    return Run(a, seed, tuple(opts.items()))


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
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, tqdm(total=len(todo), desc="study runs", unit="run") as bar:
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


# ------------------------------------------------------------------------------------------ metrics
def series(rows, key):
    """[(samples, value)] of the rows that have `key`."""
    return [(r["samples"], r[key]) for r in rows if key in r]


def final(rows, key="eval/gold_reward"):
    """Mean of the last two evaluations of `key` (of the last five training rows for train-time statistics)."""
    values = [v for _, v in series(rows, key)]
    return float(np.mean(values[-2:] if key.startswith("eval/") else values[-5:]))


def area(rows, key="eval/gold_reward"):
    """Mean of `key` over the evaluations after iteration 0: reward per sample along the learning curve."""
    return float(np.mean([r[key] for r in rows if key in r and r["iteration"] > 0]))


@dataclass
class Stat:
    values: list

    @property
    def mean(self):
        return float(np.mean(self.values))

    @property
    def std(self):
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def __str__(self):
        return f"{self.mean:.3g} +- {self.std:.2g}" if len(self.values) > 1 else f"{self.mean:.3g}"


class Results:
    """The rows of every run of an arm, over seeds, and statistics of them."""

    def __init__(self, launcher, runs_of):
        self.launcher, self.runs_of = launcher, runs_of

    def rows(self, a: Arm):
        return [read_rows(self.launcher.out / r.key) for r in self.runs_of(a)]

    def stat(self, a: Arm, fn=final, key="eval/gold_reward"):
        return Stat([fn(rows, key) for rows in self.rows(a)])

    def start(self, a: Arm):
        """gold reward at iteration 0 (pi_ref; the same for every arm of a task and seed)."""
        return Stat([rows[0]["eval/gold_reward"] for rows in self.rows(a)])


@dataclass
class Claim:
    number: int
    title: str
    prediction: str
    arms: list
    judge: Callable  # (Results) -> [(check text, passed)] and lines of numbers
    plot: Callable  # (Results, axes-owner path) -> None
    budget: Callable = None  # (arm) -> budget options; default: the task's equal budget


# --------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8})
    return plt


def reward_label(task):
    return "gold reward (mean R_mu, 0-1)" if task in BANDITS else "gold reward (-tokens)"


def curve(ax, results, a, key="eval/gold_reward", x="samples", **style):
    """Mean over seeds of `key` against samples (or gradient steps), with a +-1 std band."""
    runs = [series(rows, key) for rows in results.rows(a)]
    n = min(len(s) for s in runs)
    xs = np.array([p[0] for p in runs[0][:n]], dtype=float)
    if x != "samples":
        xs = xs * x  # a factor: gradient steps per sample
    ys = np.array([[p[1] for p in s[:n]] for s in runs])
    line = ax.plot(xs, ys.mean(0), label=style.pop("label", a.name), **style)[0]
    if len(ys) > 1:
        ax.fill_between(xs, ys.mean(0) - ys.std(0, ddof=1), ys.mean(0) + ys.std(0, ddof=1), color=line.get_color(), alpha=0.15)


def save(fig, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


# -------------------------------------------------------------------------------------------- claims
def claims(quick: bool):
    """The nine experiments. Each judge returns (numbers: [str], checks: [(str, bool)])."""
    out = []

    # 1: on-policy beats offline where the peak is unlikely; the gap shrinks where it is likely
    tasks1 = ["bandit_r1", "bandit_r2", "min_length", "mode_length"]
    pairs1 = [("online_dpo", "dpo"), ("best_of_n", "best_of_n --offline")]

    def arm_of(name, task):
        script, *flags = name.split()
        return arm(script, task, **{f.lstrip("-").replace("-", "_"): True for f in flags})

    def gain(res, on, off, task):  # on-policy minus offline final reward, as a share of the room above pi_ref
        a, b = arm_of(on, task), arm_of(off, task)
        return (res.stat(a).mean - res.stat(b).mean) / (BEST[task] - res.start(a).mean)

    def judge1(res):
        lines, checks = [], []
        for on, off in pairs1:
            for t in tasks1:
                lines.append(f"{t:12s} {on:22s} {res.stat(arm_of(on, t))!s:18s} {off:22s} {res.stat(arm_of(off, t))!s:18s} "
                             f"normalised gain {gain(res, on, off, t):+.3f}")
            for unlikely, likely in (("bandit_r1", "bandit_r2"), ("min_length", "mode_length")):
                checks.append((f"{on} > {off} on {unlikely}", res.stat(arm_of(on, unlikely)).mean > res.stat(arm_of(off, unlikely)).mean))
                checks.append((f"{on} vs {off}: normalised gain {unlikely} > {likely}",
                               gain(res, on, off, unlikely) > gain(res, on, off, likely)))
        return lines, checks

    def plot1(res, path):
        plt = _plt()
        fig, axes = plt.subplots(len(pairs1), len(tasks1), figsize=(13, 6))
        for i, (on, off) in enumerate(pairs1):
            for j, t in enumerate(tasks1):
                ax = axes[i, j]
                curve(ax, res, arm_of(on, t), label=f"{on} (on-policy)")
                curve(ax, res, arm_of(off, t), label=f"{off} (offline)", ls="--")
                ax.set_title(f"{t}: peak {'unlikely' if t in ('bandit_r1', 'min_length') else 'likely'} under pi_ref")
                ax.set_xlabel("samples")
                ax.set_ylabel(reward_label(t))
                ax.grid(alpha=0.3)
                ax.legend()
        fig.suptitle("Claim 1: on-policy vs offline, where the reward peak is unlikely (R1, min) or likely (R2, mode) under pi_ref")
        save(fig, path)

    out.append(Claim(1, "Geometry: on-policy sampling helps most where pi_ref is unlikely to reach the peak",
                     "on-policy > offline on bandit_r1 and min_length; the on-policy gain (as a share of the room above pi_ref) "
                     "is larger on bandit_r1 than bandit_r2 and on min_length than mode_length",
                     [arm_of(n, t) for pair in pairs1 for n in pair for t in tasks1], judge1, plot1))

    # 2: on the skewed data, on-policy methods beat the offline ones that use the same data
    pairs2 = [("online_dpo", "dpo"), ("online_ipo", "ipo"), ("best_of_n", "best_of_n --offline")]

    def judge2(res):
        lines, checks = [], []
        for on, off in pairs2:
            a, b = arm_of(on, "skew_length"), arm_of(off, "skew_length")
            lines.append(f"skew_length  {on:22s} {res.stat(a)!s:18s} {off:22s} {res.stat(b)!s:18s}")
            checks.append((f"{on} > {off} on skew_length", res.stat(a).mean > res.stat(b).mean))
        return lines, checks

    def plot2(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(pairs2), figsize=(13, 3.6), sharey=True)
        for ax, (on, off) in zip(axes, pairs2):
            curve(ax, res, arm_of(on, "skew_length"), label=f"{on} (on-policy, proxy RM from the same data)")
            curve(ax, res, arm_of(off, "skew_length"), label=f"{off} (offline, the skewed pairs)", ls="--")
            ax.set_xlabel("samples")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_ylabel(reward_label("skew_length"))
        fig.suptitle("Claim 2: skew_length, preference data that covers pi_ref's lengths poorly")
        save(fig, path)

    out.append(Claim(2, "On-policy sampling helps even with a reward model learned from the same (skewed) data",
                     "on skew_length each on-policy method beats its offline counterpart",
                     [arm_of(n, "skew_length") for pair in pairs2 for n in pair], judge2, plot2))

    # 3: offline, a negative gradient beats maximum likelihood; BoN + negative gradient beats BoN
    tasks3 = ["bandit_r1", "min_length"]
    neg3, ml3 = ["dpo", "ipo"], ["pref_ft", "best_of_n --offline", "rwr --offline"]

    def judge3(res):
        lines, checks = [], []
        for t in tasks3:
            for n in neg3 + ml3 + ["best_of_n", "best_of_n_neg"]:
                lines.append(f"{t:12s} {n:22s} {res.stat(arm_of(n, t))!s}")
            worst_neg = min(res.stat(arm_of(n, t)).mean for n in neg3)
            best_ml = max(res.stat(arm_of(n, t)).mean for n in ml3)
            checks.append((f"{t}: min(dpo, ipo) > max(pref_ft, best_of_n --offline, rwr --offline)", worst_neg > best_ml))
            bon, neg = res.stat(arm_of("best_of_n", t)), res.stat(arm_of("best_of_n_neg", t))
            checks.append((f"{t}: best_of_n_neg > best_of_n", neg.mean > bon.mean))
        return lines, checks

    def plot3(res, path):
        plt = _plt()
        names = neg3 + ml3 + ["best_of_n", "best_of_n_neg"]
        colors = ["tab:red"] * len(neg3) + ["tab:blue"] * len(ml3) + ["tab:blue", "tab:red"]
        fig, axes = plt.subplots(1, len(tasks3), figsize=(12, 3.8))
        for ax, t in zip(axes, tasks3):
            stats = [res.stat(arm_of(n, t)) for n in names]
            ax.bar(range(len(names)), [s.mean for s in stats], yerr=[s.std for s in stats], color=colors, capsize=3)
            ax.axhline(res.start(arm_of("dpo", t)).mean, color="gray", ls=":", label="pi_ref")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_ylabel("final " + reward_label(t))
            ax.set_title(f"{t} (red: negative gradient, blue: maximum likelihood)")
            ax.legend()
        fig.suptitle("Claim 3: negative gradient vs maximum likelihood (offline group left, on-policy Best-of-N right)")
        save(fig, path)

    out.append(Claim(3, "Offline, a negative gradient beats maximum likelihood; Best-of-N gains from one too",
                     "on bandit_r1 and min_length: dpo and ipo beat pref_ft, offline Best-of-N and offline RWR; "
                     "best_of_n_neg beats best_of_n",
                     [arm_of(n, t) for t in tasks3 for n in neg3 + ml3 + ["best_of_n", "best_of_n_neg"]], judge3, plot3))

    # 4: DPO's margin grows more than Pref-FT's; log pi(y_w) itself may fall
    def judge4(res):
        lines, checks = [], []
        for t in tasks3:
            for n in ("dpo", "pref_ft"):
                a = arm_of(n, t)
                first = Stat([series(rows, "logps/chosen")[0][1] for rows in res.rows(a)])
                lines.append(f"{t:12s} {n:8s} rewards/margins {res.stat(a, key='rewards/margins')!s:18s} "
                             f"logps/chosen {first} -> {res.stat(a, key='logps/chosen')}")
            checks.append((f"{t}: dpo's final margin > pref_ft's", res.stat(arm_of("dpo", t), key="rewards/margins").mean >
                           res.stat(arm_of("pref_ft", t), key="rewards/margins").mean))
        return lines, checks

    def plot4(res, path):
        plt = _plt()
        fig, axes = plt.subplots(2, len(tasks3), figsize=(12, 6))
        for j, t in enumerate(tasks3):
            for n, ls in (("dpo", "-"), ("pref_ft", "--")):
                curve(axes[0, j], res, arm_of(n, t), key="rewards/margins", ls=ls)
                curve(axes[1, j], res, arm_of(n, t), key="logps/chosen", ls=ls)
            axes[0, j].set_ylabel("beta (h(y_w) - h(y_l)), nats")
            axes[1, j].set_ylabel("log pi(y_w | x), nats")
            for i in range(2):
                axes[i, j].set_title(t)
                axes[i, j].set_xlabel("samples (pairs)")
                axes[i, j].grid(alpha=0.3)
                axes[i, j].legend()
        fig.suptitle("Claim 4: the implicit-reward margin and the chosen log-likelihood over training")
        save(fig, path)

    out.append(Claim(4, "DPO's margin grows more than Pref-FT's (log pi(y_w) may still fall)",
                     "rewards/margins at the end of training: dpo > pref_ft on bandit_r1 and min_length",
                     [arm_of(n, t) for t in tasks3 for n in ("dpo", "pref_ft")], judge4, plot4))

    # 5: on-policy + negative gradient (online DPO / IPO) is best or fastest
    methods5 = OBJECTIVES[:5] + ["best_of_n --offline"] + OBJECTIVES[5:]

    def judge5(res):
        lines, checks = [], []
        for t in TASKS:
            present = [n for n in methods5 if script_exists(n.split()[0])]
            fin = {n: res.stat(arm_of(n, t)) for n in present}
            auc = {n: res.stat(arm_of(n, t), fn=area) for n in present}
            by_final, by_auc = sorted(present, key=lambda n: -fin[n].mean), sorted(present, key=lambda n: -auc[n].mean)
            lines.append(f"{t:12s} best final: " + ", ".join(f"{n} {fin[n]}" for n in by_final[:4]))
            lines.append(f"{'':12s} best reward per sample: " + ", ".join(f"{n} {auc[n]}" for n in by_auc[:4]))
            ok = by_final[0] in ("online_dpo", "online_ipo") or by_auc[0] in ("online_dpo", "online_ipo")
            checks.append((f"{t}: online_dpo or online_ipo ranks first by final reward or by reward per sample", ok))
        present = [n for n in methods5 if script_exists(n.split()[0])]
        lines += ["", "final gold reward (KL(pi || pi_ref)) of every objective at its defaults, mean +- std over seeds:",
                  "| objective | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for n in present:
            cells = [f"{res.stat(arm_of(n, t))} ({res.stat(arm_of(n, t), key='eval/kl_ref').mean:.2g})" for t in TASKS]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return lines, checks

    def plot5(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(TASKS), figsize=(17, 4))
        for ax, t in zip(axes, TASKS):
            for n in methods5:
                if script_exists(n.split()[0]):
                    bold = n in ("online_dpo", "online_ipo")
                    curve(ax, res, arm_of(n, t), lw=2.2 if bold else 0.9, alpha=1.0 if bold else 0.7, ls="-" if bold else "--")
            ax.set_title(t)
            ax.set_xlabel("samples")
            ax.set_ylabel(reward_label(t))
            ax.grid(alpha=0.3)
        axes[-1].legend(bbox_to_anchor=(1.02, 1), loc="upper left")
        fig.suptitle("Claim 5: every objective at its tuned defaults and equal budgets (bold: online DPO / IPO)")
        save(fig, path)

    out.append(Claim(5, "On-policy sampling + negative gradient (online DPO / IPO) is best or fastest",
                     "on every task, online_dpo or online_ipo ranks first by final gold reward or by reward per sample",
                     [arm_of(n, t) for t in TASKS for n in methods5], judge5, plot5))

    # 6: sample reuse on bandit_r1
    epochs6, methods6 = [1, 2, 4, 8], ["online_dpo", "best_of_n", "ppo"]

    def arm6(m, e):  # T = 1 is every script's default: the same runs as claims 1 and 5
        return arm(m, "bandit_r1", **({"update_epochs": e} if e > 1 else {}))

    def judge6(res):
        lines, checks, drop = [], [], {}
        for m in methods6:
            s = {e: res.stat(arm6(m, e)) for e in epochs6}
            lines.append(f"bandit_r1 {m:12s} " + "  ".join(f"T={e}: {s[e]!s:16s}" for e in epochs6))
            start = res.start(arm6(m, 1)).mean
            peak = max(v.mean for v in s.values())
            drop[m] = (peak - s[8].mean) / (peak - start)
            checks.append((f"{m}: T=2 > T=1 (a little reuse helps)", s[2].mean > s[1].mean))
            if m != "ppo":
                checks.append((f"{m}: T=8 below its best T (much reuse hurts)", s[8].mean < peak))
        lines.append("drop from the best T to T=8, as a share of the gain: " + ", ".join(f"{m} {d:.3f}" for m, d in drop.items()))
        checks.append(("ppo loses the least from T=8", drop["ppo"] <= min(drop.values())))
        return lines, checks

    def plot6(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m in methods6:
            s = [res.stat(arm6(m, e)) for e in epochs6]
            axes[0].errorbar(epochs6, [v.mean for v in s], yerr=[v.std for v in s], marker="o", capsize=3, label=m)
            curve(axes[1], res, arm6(m, 8), label=f"{m}, T=8")
        axes[0].set_xscale("log", base=2)
        axes[0].set_xticks(epochs6, [str(e) for e in epochs6])
        axes[0].set_xlabel("T, gradient passes over each batch")
        axes[0].set_ylabel("final " + reward_label("bandit_r1"))
        axes[1].set_xlabel("samples")
        axes[1].set_ylabel(reward_label("bandit_r1"))
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Claim 6: sample reuse on bandit_r1 (equal samples; T times the gradient steps)")
        save(fig, path)

    out.append(Claim(6, "Sample reuse: a little helps, much hurts the non-RL methods, PPO tolerates it best",
                     "on bandit_r1: T=2 beats T=1; online_dpo and best_of_n do worse at T=8 than at their best T; ppo loses least at T=8",
                     [arm6(m, e) for m in methods6 for e in epochs6], judge6, plot6))

    # 7: fresher data (smaller B at fixed M) gives more reward per gradient step on min_length
    sizes7, tasks7, minibatch7 = [64, 128, 256, 512], ["min_length", "mode_length"], 16
    steps7 = 128 if quick else 256  # gradient steps of every run: I = steps * M / B iterations

    def arm7(t, b):
        iters = steps7 * minibatch7 // b
        return arm("online_dpo", t, batch_size=b, minibatch_size=minibatch7, num_iterations=iters, eval_every=max(1, iters // 8))

    def judge7(res):
        lines, checks, spread = [], [], {}
        for t in tasks7:
            s = {b: res.stat(arm7(t, b)) for b in sizes7}
            lines.append(f"{t:12s} online_dpo, {steps7} gradient steps of M={minibatch7}: " + "  ".join(f"B={b}: {s[b]}" for b in sizes7))
            spread[t] = (s[64].mean - s[512].mean) / (BEST[t] - res.start(arm7(t, 64)).mean)
        lines.append("B=64 minus B=512, as a share of the room above pi_ref: " + ", ".join(f"{t} {v:+.3f}" for t, v in spread.items()))
        for t in tasks7:  # not a check (the checks compare final rewards): the mean along the curve, i.e. how fast it got there
            lines.append(f"{t:12s} mean gold over the evaluations after step 0: " +
                         "  ".join(f"B={b}: {res.stat(arm7(t, b), fn=area)}" for b in sizes7))
        checks.append(("min_length: B=64 > B=512 at equal gradient steps", spread["min_length"] > 0))
        checks.append(("the freshness gain is larger on min_length than on mode_length", spread["min_length"] > spread["mode_length"]))
        return lines, checks

    def plot7(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks7), figsize=(11, 3.8))
        for ax, t in zip(axes, tasks7):
            for b in sizes7:
                curve(ax, res, arm7(t, b), x=1 / minibatch7, label=f"B={b} ({b // minibatch7} steps per collection)")
            ax.set_title(t)
            ax.set_xlabel("gradient steps")
            ax.set_ylabel(reward_label(t))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"Claim 7: online DPO, fresher data (smaller B) at fixed minibatch M={minibatch7} and equal gradient steps")
        save(fig, path)

    out.append(Claim(7, "Fresher data (smaller B at fixed M) gives more reward per gradient step where the peak is unlikely",
                     "at equal gradient steps, B=64 beats B=512 on min_length, by more (relative to the room) than on mode_length",
                     [arm7(t, b) for t in tasks7 for b in sizes7], judge7, plot7, budget=lambda a: ()))

    # 8: the mode-seeking toy
    toy = Arm("mode_seeking", "toy")

    def judge8(res):
        (r,) = res.rows(toy)
        slow, fast = r["starts"].values()
        lines = [f"{name}: steps to 90% of p's target mass: forward {s['steps_to_goal']['forward']}, "
                 f"reverse {s['steps_to_goal']['reverse']}; "
                 f"mass after 25 steps: forward {s['forward'][25]:.3f}, reverse {s['reverse'][25]:.3f}" for name, s in r["starts"].items()]
        checks = [("with some mass on the target, reverse KL reaches it in fewer steps",
                   (fast["steps_to_goal"]["reverse"] or 1e9) < (fast["steps_to_goal"]["forward"] or 1e9)),
                  ("with q near 0 there, reverse KL starts slower (less mass after 25 steps)", slow["reverse"][25] < slow["forward"][25])]
        return lines, checks

    def plot8(res, path):
        spec = importlib.util.spec_from_file_location("mode_seeking", ROOT / "benchmarks" / "mode_seeking.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.plot(res.rows(toy)[0], path)

    out.append(Claim(8, "Mode-seeking: reverse KL concentrates mass on a target mode faster, but starts slowly where q is near 0",
                     "from a start with some mass there, reverse-KL descent reaches 90% of p's mass first; from pi_data it lags at first",
                     [toy], judge8, plot8, budget=lambda a: ()))

    # 9: HyPO keeps KL far below DPO's at equal or better reward
    tasks9 = ["min_length", "skew_length"]

    def judge9(res):
        lines, checks = [], []
        for t in tasks9:
            h, d = arm("hypo", t), arm("dpo", t)
            kh, kd = res.stat(h, key="eval/kl_ref"), res.stat(d, key="eval/kl_ref")
            gh, gd = res.stat(h), res.stat(d)
            lines.append(f"{t:12s} hypo: gold {gh!s:16s} KL {kh!s:16s}   dpo: gold {gd!s:16s} KL {kd!s:16s}")
            checks.append((f"{t}: hypo's KL(pi || pi_ref) < dpo's", kh.mean < kd.mean))
            checks.append((f"{t}: hypo's gold reward >= dpo's (within one seed std)", gh.mean >= gd.mean - max(gh.std, gd.std)))
        return lines, checks

    def plot9(res, path):
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks9), figsize=(11, 3.8))
        for ax, t in zip(axes, tasks9):
            for n, marker in (("hypo", "o"), ("dpo", "s")):
                rows = res.rows(arm(n, t))
                m = min(len(series(r, "eval/kl_ref")) for r in rows)
                kl = np.mean([[v for _, v in series(r, "eval/kl_ref")[:m]] for r in rows], 0)
                gold = np.mean([[v for _, v in series(r, "eval/gold_reward")[:m]] for r in rows], 0)
                ax.plot(kl, gold, marker=marker, label=f"{n} (each point an evaluation, mean over seeds)")
            ax.set_title(t)
            ax.set_xlabel("KL(pi || pi_ref), nats")
            ax.set_ylabel(reward_label(t))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Claim 9: reward against KL to pi_ref over training, HyPO vs DPO")
        save(fig, path)

    out.append(Claim(9, "HyPO keeps KL(pi || pi_ref) far below DPO's at equal or better reward",
                     "on min_length and skew_length, hypo's final KL is below dpo's and its gold reward not lower (within one seed std)",
                     [arm(n, t) for t in tasks9 for n in ("hypo", "dpo")], judge9, plot9))
    return {c.number: c for c in out}


# ------------------------------------------------------------------------------------------- driver
def equal_budget(task, quick):
    """What every arm on `task` gets within a claim: B = 64, the task's iterations, an evaluation every 10 (5 with --quick)."""
    return (("batch-size", "64"), ("num-iterations", str(ITERATIONS[task] // (2 if quick else 1))), ("eval-every", "5" if quick else "10"))


def prebuild(tasks):
    """Build every task's cache once, in this process and with progress, before runs race to build it."""
    sys.path.insert(0, str(ROOT))
    from tasks import make_task

    for t in tasks:
        make_task(t)


def run_claims(args: Args, out: Path, figures: Path):
    all_claims = claims(args.quick)
    unknown = [c for c in args.claims if c not in all_claims]
    if unknown:
        raise SystemExit(f"unknown claim ids {unknown}: choose among {sorted(all_claims)}")
    seeds = [1] if args.quick else list(range(1, args.seeds + 1))
    chosen = [all_claims[c] for c in args.claims]
    runs_by_arm = {}
    for c in chosen:
        for a in c.arms:
            budget = c.budget(a) if c.budget else equal_budget(a.task, args.quick)
            arm_seeds = [1] if a.script == "mode_seeking" else seeds  # the toy is deterministic
            runs_by_arm[(c.number, a)] = [make_run(a, s, budget, args.max_iterations) for s in arm_seeds]
    runs = [r for rs in runs_by_arm.values() for r in rs]
    out.mkdir(parents=True, exist_ok=True)
    prebuild(sorted({r.arm.task for r in runs if r.arm.task in TASKS and script_exists(r.arm.script)}))
    launcher = Launcher(out, args.workers)
    start = time.time()
    launcher.launch(runs)
    report, summary = [], []
    for c in chosen:
        mine = [r for a in c.arms for r in runs_by_arm[(c.number, a)]]
        missing = sorted({r.arm.script for r in mine if not script_exists(r.arm.script)})
        failed = [r.key for r in mine if script_exists(r.arm.script) and not launcher.done(r)]
        res = Results(launcher, lambda a, n=c.number: runs_by_arm[(n, a)])
        lines, checks = [], []
        if missing:
            verdict, lines = "MISSING", [f"scripts not in algos/ yet: {', '.join(missing)}"]
        elif failed:
            verdict = "FAILED"
            lines = [f"run failed: {k}" + (f"\n{launcher.failed[k]}" if k in launcher.failed else " (see its stderr.txt)") for k in failed]
        else:
            lines, checks = c.judge(res)
            verdict = "HOLDS" if all(ok for _, ok in checks) else "DOES NOT HOLD"
            c.plot(res, figures / f"claim{c.number}.png")
        report.append(f"\n## Claim {c.number}: {c.title}: {verdict}\npredicted: {c.prediction}\n" + "\n".join(lines) +
                      ("\n" if checks else "") + "\n".join(f"  [{'x' if ok else ' '}] {text}" for text, ok in checks))
        summary.append({"claim": c.number, "title": c.title, "verdict": verdict, "checks": [[t, bool(ok)] for t, ok in checks],
                        "numbers": lines})
    run_s = sum(json.loads((out / r.key / "done.json").read_text()).get("wall_s", 0.0) for r in set(runs) if launcher.done(r))
    header = (f"# cleanpref study: {len(chosen)} claims, seeds {seeds}{' (quick)' if args.quick else ''}, "
              f"{len(set(runs))} runs, {time.time() - start:.0f} s this invocation; the runs took {run_s / 60:.1f} min "
              f"one after another ({run_s / 60 / args.workers:.1f} min at {args.workers} workers)\n")
    table = "\n| claim | verdict | checks passed |\n|---|---|---|\n" + "\n".join(
        f"| {s['claim']}. {s['title']} | {s['verdict']} | {sum(ok for _, ok in s['checks'])}/{len(s['checks'])} |" for s in summary)
    text = header + table + "\n" + "\n".join(report) + "\n"
    print(text)
    try:
        (out / "report.md").write_text(text)
        (out / "report.json").write_text(json.dumps(summary, indent=1))
    except OSError as err:
        raise SystemExit(f"cannot write the report under {out}: {err} (disk full?); the runs are kept, rerun to resume") from None
    print(f"report: {out / 'report.md'}; figures: {figures}/")
    return summary


def load_defaults(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pick_lr(scores: dict):
    """The tuning rule: the learning rate with the best score; scores within 1e-6 tie, and the smaller rate wins."""
    finite = {lr: sc for lr, sc in scores.items() if np.isfinite(sc)}
    return max(finite, key=lambda lr: (round(finite[lr], 6), -lr)) if finite else None


def run_tune(args: Args, out: Path):
    scripts = args.tune_scripts or [s for s in OBJECTIVES if script_exists(s)]
    missing = [s for s in scripts if not script_exists(s)]
    if missing:
        raise SystemExit(f"no such scripts in algos/: {missing}")
    variants = [(s, v) for s in scripts for v in [()] + VARIANTS.get(s, [])]
    runs = {}
    for s, v in variants:
        for t in args.tune_tasks:
            for lr in LR_GRID[t]:
                a = arm(s, t, learning_rate=lr, **{flag: True for flag in v})
                runs[(s, v, t, lr)] = make_run(a, 1, equal_budget(t, False), args.max_iterations)
    out.mkdir(parents=True, exist_ok=True)
    prebuild(args.tune_tasks)
    launcher = Launcher(out, args.workers)
    launcher.launch(list(runs.values()))
    for s, v in variants:
        module = load_defaults(s)
        if "offline" in v:  # offline variants keep their own learning rates
            current_lr = module.OFFLINE_LEARNING_RATES.get
        else:
            current_lr = lambda t: module.TASK_DEFAULTS.get(t, {}).get("learning_rate")  # noqa: E731
        print(f"\n{s} {' '.join('--' + f for f in v)}: score = mean of the last two eval/gold_reward (seed 1)")
        print("| task | " + " | ".join("lr" for _ in range(5)) + " | best | in the script |")
        chosen = {}
        for t in args.tune_tasks:
            scores = {lr: (final(read_rows(out / runs[(s, v, t, lr)].key)) if launcher.done(runs[(s, v, t, lr)]) else float("nan"))
                      for lr in LR_GRID[t]}
            chosen[t] = best = pick_lr(scores)
            current = current_lr(t)
            print(f"| {t} | " + " | ".join(f"{lr:g}: {sc:.3g}" for lr, sc in scores.items()) +
                  f" | {best} | {current}{'' if current == best else '  <- differs'} |")
        print("learning rates by task: " + ", ".join(f'"{t}": {lr:g}' for t, lr in chosen.items()))


def main(args: Args):
    out = Path(args.out or ("runs/study_quick" if args.quick else "runs/study"))
    if args.tune:
        return run_tune(args, out / "tune")
    figures = Path(args.figures or (out / "figures" if args.quick else ROOT / "benchmarks" / "figures"))
    return run_claims(args, out, figures)


if __name__ == "__main__":
    main(tyro.cli(Args))
