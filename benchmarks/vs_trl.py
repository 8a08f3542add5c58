"""Side by side with TRL: online_dpo.py vs OnlineDPOTrainer and dpo.py vs DPOTrainer, on the same work.

    pip install -r requirements.txt && pip install trl==1.16.0      # TRL is not a dependency of cleanpref
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py                   # ~10 minutes on one CPU thread
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --breakdown       # also: where one online_dpo iteration goes
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --breakdown-only --baseline ../before   # that alone, beside another checkout

The same work on both sides, from the min_length task's artifacts (pi_ref, proxy reward model,
preference pairs, train prompts), fp32, learning rate 1e-12 (the policy stays pi_ref, so both sides
sample responses of the same length distribution all along):
- online: 32 prompts x 2 completions per iteration, up to the task's 64 new tokens at temperature 1,
  the proxy reward model ranks them, one DPO optimizer step (beta 0.1) on the 32 pairs;
  `algos/online_dpo.py --batch-size 64 --minibatch-size 64` vs `OnlineDPOTrainer(per_device_train_batch_size=32)`.
- DPO: one optimizer step on 64 preference pairs with reference log-probs precomputed;
  `algos/dpo.py --batch-size 64 --minibatch-size 64` vs `DPOTrainer(precompute_ref_log_probs=True)`.
TRL "matched" turns off what cleanpref does not do (gradient checkpointing, which also turns the KV
cache off in generation; bf16 autocast) and logs never; TRL "defaults" keeps its defaults for those.
TRL reads text, so it gets the prompts and pairs decoded by the task's tokenizer (it appends EOS itself).

Each contender runs the real thing (the cleanpref script, `trainer.train()`) in a fresh subprocess and
reports its per-iteration wall times (iteration to iteration, everything included; warm-up and
evaluation iterations dropped). Rounds interleave the contenders, so machine drift hits all alike;
the table shows medians over all rounds and the ratio of medians (TRL time / cleanpref time).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK, LR, WARMUP = "min_length", 1e-12, 2
CONTENDERS = {  # name -> (kind, settings)
    "online_dpo.py": ("cleanpref", "online_dpo"),
    "OnlineDPOTrainer, matched": ("trl", "online_matched"),
    "OnlineDPOTrainer, defaults": ("trl", "online_defaults"),
    "dpo.py": ("cleanpref", "dpo"),
    "DPOTrainer, matched": ("trl", "dpo_matched"),
    "DPOTrainer, defaults": ("trl", "dpo_defaults"),
}


def cleanpref_times(script, iterations, threads, root=ROOT):
    """Per-iteration seconds of the real script (eval only at 0 and the end, on 8 prompts; both dropped)."""
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, str(Path(root) / "algos" / f"{script}.py"), "--task", TASK, "--learning-rate", str(LR), "--batch-size", "64",
               "--minibatch-size", "64", "--num-iterations", str(WARMUP + iterations + 1), "--eval-every", "100000", "--num-eval-prompts", "8",
               "--threads", str(threads)] + (["--num-completions", "2"] if script == "online_dpo" else [])  # TRL's pairs: C = 2
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{script}.py failed:\n{out.stderr[-2000:]}")
        (run_dir,) = (Path(cwd) / "runs").iterdir()
        t = [json.loads(line)["time_s"] for line in open(run_dir / "metrics.jsonl")]
    return [b - a for a, b in zip(t[:-2], t[1:-1])][WARMUP:]  # row i - row i-1, i = 1..iterations; the last row holds an eval


def trl_times(setting, iterations, threads):
    """Per-iteration seconds of TRL's trainer.train() (time between consecutive optimizer-step ends)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from tasks import make_task

    torch.set_num_threads(threads)
    task = make_task(TASK)
    tok = task.tokenizer
    tok.padding_side = "left"
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    matched = setting.endswith("matched")
    speed = dict(gradient_checkpointing=False, bf16=False) if matched else {}
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=WARMUP + iterations, learning_rate=LR, report_to=[], save_strategy="no",
                  logging_steps=10**6, use_cpu=True, seed=1, dataloader_num_workers=0, disable_dropout=True, **speed)
    policy, ref = task.load_policy(), task.load_policy()
    if setting.startswith("online"):
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        rm = AutoModelForSequenceClassification.from_pretrained(task.reward_model_path).eval()
        prompts = Dataset.from_dict({"prompt": [tok.decode(p) for p in task.train_prompts]})
        cfg = OnlineDPOConfig(per_device_train_batch_size=32, max_new_tokens=task.max_new_tokens, temperature=task.temperature,
                              beta=0.1, missing_eos_penalty=10.0, **common)
        trainer = OnlineDPOTrainer(model=policy, ref_model=ref, reward_funcs=rm, args=cfg, train_dataset=prompts,
                                   processing_class=tok, reward_processing_classes=tok, callbacks=[Stamp()])
    else:
        from trl import DPOConfig, DPOTrainer

        d = task.preference_data
        pairs = Dataset.from_dict({"prompt": [tok.decode(p) + " " for p in d["prompt_ids"]], "chosen": d["chosen"], "rejected": d["rejected"]})
        cfg = DPOConfig(per_device_train_batch_size=64, precompute_ref_log_probs=True, beta=0.1, **common)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=pairs, processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return [b - a for a, b in zip(stamps[:-1], stamps[1:])][WARMUP - 1 :]


def worker(name, iterations, threads):
    if " @ " in name:  # a script of another checkout (--baseline)
        script, root = name.split(" @ ")
        return cleanpref_times(script[: -len(".py")], iterations, threads, root)
    kind, setting = CONTENDERS[name]
    if kind == "cleanpref":
        return cleanpref_times(setting, iterations, threads)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return trl_times(setting, iterations, threads)


def checkout(root):
    """(common, online_dpo) modules of the cleanpref checkout at `root`, imported beside this one's."""
    import importlib.util

    saved = {k: sys.modules.pop(k) for k in ("common",) if k in sys.modules}
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(f"common@{root}", Path(root) / "common.py")
        common = importlib.util.module_from_spec(spec)
        sys.modules["common"] = common
        spec.loader.exec_module(common)
        spec = importlib.util.spec_from_file_location(f"online_dpo@{root}", Path(root) / "algos" / "online_dpo.py")
        od = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(od)  # binds its common functions to this checkout's
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("common", None)
        sys.modules.update(saved)
    return common, od


def breakdown(threads, baseline=None, rounds=12):
    """Where one online_dpo iteration goes (the script's own steps, timed one by one), against the model's FLOPs.

    The FLOP floor of a step is its real tokens (x3 for forward + backward; sampling: each distinct prompt once, then the
    responses) at the rate of a dense matmul of the model's shapes, measured in every round beside the steps (the
    machine's speed drifts). With `baseline`, that checkout's common.py and online_dpo.py run the same iterations
    (same draws) in the same rounds, interleaved."""
    import torch

    from tasks import make_task

    torch.set_num_threads(threads)
    roots = {"now": ROOT} if baseline is None else {"now": ROOT, "baseline": Path(baseline)}
    sides = {k: checkout(r) for k, r in roots.items()}
    task = make_task(TASK)
    models = {k: (task.load_policy(), task.load_policy().requires_grad_(False)) for k in roots}
    opts = {k: torch.optim.Adam(models[k][0].parameters(), lr=LR) for k in roots}
    pad, cfg = task.pad_token_id, models["now"][0].config
    # forward FLOPs per token: 2 x (weights every token multiplies: layers + output head); attention's own is < 5% here
    flops_token = 2 * (sum(p.numel() for n, p in models["now"][0].named_parameters() if "embed_tokens" not in n))
    a, b = torch.randn(2048, cfg.hidden_size), torch.randn(cfg.intermediate_size, cfg.hidden_size)
    names = ("sampling", "reward model", "reference log-probs", "policy fwd+bwd+Adam", "iteration")
    steps = {k: {n: [] for n in names} for k in roots}
    tokens, peaks = {n: [] for n in names}, []
    for it in range(rounds):
        for _ in range(3):
            torch.nn.functional.linear(a, b)
        t = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(a, b)
        peak = 20 * 2 * a.shape[0] * b.numel() / (time.perf_counter() - t)  # a dense matmul of this model's shapes, this thread
        for side, (common, od) in list(sides.items())[:: 1 if it % 2 else -1]:  # alternate which side goes first
            policy, ref = models[side]
            sampler, prompt_sampler = torch.Generator().manual_seed(it), torch.Generator().manual_seed(it)
            t0 = time.perf_counter()
            batch = torch.randint(len(task.train_prompts), (32,), generator=prompt_sampler)
            prompts = common.pad_rows([task.train_prompts[i] for i in batch.tolist()], pad, left=True)
            queries = prompts.repeat_interleave(2, dim=0)
            with torch.no_grad():
                responses, _ = common.generate(policy, queries, pad, task.eos_token_id, task.max_new_tokens, task.temperature, sampler)
                t1 = time.perf_counter()
                scores = task.proxy_reward(queries, responses).view(32, 2)
                t2 = time.perf_counter()
                rows = torch.arange(32)
                pairs = responses.view(32, 2, -1)
                chosen, rejected = pairs[rows, scores.argmax(1)], pairs[rows, scores.argmin(1)]
                ref_logps = torch.stack(od.sequence_logprobs(ref, task, prompts, chosen, rejected), 1)
                t3 = time.perf_counter()
            chosen_logps, rejected_logps = od.sequence_logprobs(policy, task, prompts, chosen, rejected)
            losses, _, _ = od.dpo_loss(chosen_logps, rejected_logps, ref_logps[:, 0], ref_logps[:, 1], 0.1)
            opts[side].zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opts[side].step()
            t4 = time.perf_counter()
            if it >= WARMUP:
                for k, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    steps[side][k].append(dt)
        if it >= WARMUP:  # the same draws on every side: the same tokens
            n_prompt, n_query = int((prompts != pad).sum()), int((queries != pad).sum())  # sampling needs each prompt once
            n_response = int((responses != pad).sum())
            n_pair = n_query + int((chosen != pad).sum() + (rejected != pad).sum())
            for k, n in zip(names, (n_prompt + n_response, n_query + n_response, n_pair, 3 * n_pair, None)):
                tokens[k].append(n)
            peaks.append(peak)
    peak = statistics.median(peaks)
    print(f"\nOne online_dpo iteration on {TASK} (32 prompts x 2, lr {LR}), medians of {rounds - WARMUP} interleaved rounds; model "
          f"{flops_token / 2e6:.2f}M weights per token, forward {flops_token / 1e6:.2f} MFLOP/token; dense matmul of its shapes: "
          f"{peak / 1e9:.0f} GFLOP/s (median of the rounds, {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    cols = " | ".join(f"{k}: time (min) | share | time / floor" for k in roots)
    print(f"| step | real tokens (x3 for fwd+bwd) | FLOP floor | {cols} |\n|---|---|---|" + "---|---|---|" * len(roots))
    med = {s: {k: statistics.median(v) for k, v in steps[s].items()} for s in roots}
    for k in names:  # medians; the min over rounds beside them (on a busy machine others' work only adds time)
        times = {s: f"{med[s][k] * 1000:.0f} ms ({min(steps[s][k]) * 1000:.0f})" for s in roots}
        if k == "iteration":
            print(f"| {k} | | | {' | '.join(f'{times[s]} | 100% | ' for s in roots)} |")
            continue
        floor = statistics.median(tokens[k]) * flops_token / peak
        cells = " | ".join(f"{times[s]} | {med[s][k] / med[s]['iteration']:.0%} | {med[s][k] / floor:.1f}x" for s in roots)
        print(f"| {k} | {statistics.median(tokens[k]):.0f} | {floor * 1000:.0f} ms | {cells} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each contender once per round)")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per contender and round (after 2 warm-up)")
    p.add_argument("--defaults-iterations", type=int, default=3, help="timed iterations for TRL at its defaults (slow)")
    p.add_argument("--only", nargs="*", default=None, help="a subset of contenders (names as in the table)")
    p.add_argument("--breakdown", action="store_true", help="also time the steps of one online_dpo iteration")
    p.add_argument("--breakdown-only", action="store_true", help="only the breakdown (no TRL needed); with --baseline, both side by side")
    p.add_argument("--baseline", default=None, help="another cleanpref checkout whose scripts join the rounds (e.g. before a change)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    if a.worker:
        print("TIMES " + json.dumps(worker(a.worker, a.iterations, threads)))
        return
    if a.breakdown_only:
        from tasks import make_task

        make_task(TASK)
        return breakdown(threads, a.baseline)
    try:
        import trl
    except ImportError:
        raise SystemExit("benchmarks/vs_trl.py needs TRL, which cleanpref does not depend on: pip install -r requirements.txt "
                         "(the pinned torch first), then pip install trl==1.16.0") from None
    if trl.__version__ != "1.16.0":
        print(f"note: TRL {trl.__version__} (docs/benchmarks.md's table was measured with 1.16.0)")
    from tasks import make_task

    make_task(TASK)  # build the task's artifacts once, before any timing
    names = a.only or list(CONTENDERS)
    if a.baseline:
        base = str(Path(a.baseline).resolve())
        names = [x for n in names for x in ([n, f"{n} @ {base}"] if CONTENDERS[n][0] == "cleanpref" else [n])]
    times = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            iters = a.defaults_iterations if n.endswith("defaults") else a.iterations
            out = subprocess.run([sys.executable, __file__, "--worker", n, "--iterations", str(iters)], capture_output=True,
                                 text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"))
            line = [x for x in out.stdout.splitlines() if x.startswith("TIMES ")]
            if out.returncode or not line:
                raise SystemExit(f"{n} failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
            times[n] += json.loads(line[0][6:])
            print(f"round {r + 1}: {n}: median {statistics.median(times[n]) * 1000:.0f} ms over {len(times[n])} iterations", flush=True)
    print(f"\ntorch threads {threads}, fp32, TRL {trl.__version__}, {a.rounds} interleaved rounds; ratio = TRL time / cleanpref time\n")
    print("| contender | per iteration (median) | min - max | iterations | cleanpref speed-up |\n|---|---|---|---|---|")
    for n in names:
        m = statistics.median(times[n])
        mine = "online_dpo.py" if n.startswith(("Online", "online")) else "dpo.py"
        ratio = f"{m / statistics.median(times[mine]):.2f}x" if mine in times and n != mine else ""
        print(f"| {n} | {m * 1000:.0f} ms | {min(times[n]) * 1000:.0f} - {max(times[n]) * 1000:.0f} ms | {len(times[n])} | {ratio} |")
    if a.breakdown:
        breakdown(threads, a.baseline)
    print(f"\nreproduce: OMP_NUM_THREADS={threads} python benchmarks/vs_trl.py --rounds {a.rounds} --iterations {a.iterations}"
          + (" --breakdown" if a.breakdown else "") + (f" --baseline {a.baseline}" if a.baseline else ""))


if __name__ == "__main__":
    main()
