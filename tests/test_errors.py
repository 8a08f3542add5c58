"""Bad input fails fast with one line (issue 20): every case below runs a script as a user would and must exit with code 2,
print exactly one line on stderr (naming the flag or path), no traceback, and leave no run directory. Nearly all fail
before any task builds or model loads (seconds each), on an empty cache that stays empty, and print no run's config line.
Also: the task cache read-only once built, and a build's lock that says what it waits for.
"""

import fcntl
import json
import shutil
import threading
import time

import pytest
from conftest import load_script, run

TASK = ["--task", "min_length"]  # the --dataset/--prompts/--model cases fail before it builds (or loads) anything


@pytest.fixture(scope="module")
def inputs(local_pythia, tmp_path_factory):
    """The files a new user might pass: good ones (a tiny model, demonstrations, preference pairs) and bad ones."""
    model_dir, _, _ = local_pythia
    d = tmp_path_factory.mktemp("inputs")
    pairs = [{"prompt": f"write a story about the cat {i} .", "chosen": "the cat sleeps .", "rejected": "the cat " * (3 + i)} for i in range(8)]
    lines = [json.dumps(r) for r in pairs]
    (d / "pairs8.jsonl").write_text("\n".join(lines) + "\n")
    (d / "malformed.jsonl").write_text("\n".join(lines[:2] + [lines[2][:-5]] + lines[3:]) + "\n")  # line 3 cut short
    (d / "empty.jsonl").write_text("")
    (d / "wrong_columns.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (d / "not_objects.jsonl").write_text(lines[0] + "\n5\n")
    (d / "pairs.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    (d / "demos.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": "one two"}) + "\n" for i in range(12)))
    (d / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}", "chosen": "one", "rejected": "one two three"}) + "\n"
                                           for i in range(12)))
    (d / "empty_model").mkdir()
    shutil.copytree(model_dir, d / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    shutil.copytree(model_dir, d / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(model_dir, d / "truncated")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    saved = d / "runs" / "a_run"  # what start_run reads of a resumable run (it refuses before anything loads)
    (saved / "model").mkdir(parents=True)
    (saved / "model" / "training_state.pt").write_bytes(b"")
    (saved / "args.json").write_text(json.dumps(dict(vars(load_script("dpo").Args()), task="min_length", num_iterations=10,
                                                     learning_rate=1e-3, batch_size=64, num_minibatches=4)))
    return d


def cases():
    """(script, arguments with {d} for the inputs directory and {m} for a good model, what the one line must say)."""
    table = []
    for script in ("dpo", "online_dpo", "ppo"):  # offline, on-policy, policy gradient: the list
        table += [
            (script, "--batch-size 0", "--batch-size must be > 0, got 0"),
            (script, "--learning-rate -1", "--learning-rate must be > 0, got -1.0"),
            (script, "--eval-every 0", "--eval-every must be > 0, got 0"),
            (script, "--update-epochs 0", "--update-epochs must be > 0, got 0"),
            (script, "--resume {d}/runs/a_run --batch-size 32", "--batch-size 32 differs from the run's 64"),
        ]
    table += [  # the rest of the shared checks (start_run, exact_div) once
        ("dpo", "--minibatch-size 0", "--minibatch-size must be > 0, got 0"),
        ("dpo", "--batch-size 10 --minibatch-size 4", "--batch-size / --minibatch-size: 10 is not divisible by 4"),
        ("dpo", "--learning-rate nan", "--learning-rate must be > 0, got nan"),
        ("dpo", "--num-iterations 0", "--num-iterations must be > 0, got 0"),
        ("dpo", "--num-eval-prompts 0", "--num-eval-prompts must be > 0, got 0"),
        ("dpo", "--max-grad-norm 0", "--max-grad-norm must be > 0, got 0.0"),
        ("dpo", "--threads 0", "--threads must be > 0, got 0"),
        ("dpo", "--seed -1", "--seed must lie in [0, 2**32), got -1"),
        ("dpo", "--fsdp", "--fsdp shards over processes: launch with torchrun"),
        ("dpo", "--resume {d}/runs/missing", "no run with a checkpoint there"),
        ("dpo", "--resume {d}/runs/a_run --num-iterations 5", "--num-iterations 5 differs from the run's 10"),
        ("dpo", "--beta 0", "--beta must be > 0, got 0.0"),
        ("simpo", "--beta 0", "--beta must be > 0, got 0.0"),  # the forks' knobs (docs/fork.md)
        ("simpo", "--gamma -1", "--gamma must be >= 0, got -1.0"),
        ("orpo", "--lam -0.5", "--lam must be >= 0, got -0.5"),
        ("kto", "--beta 0", "--beta must be > 0, got 0.0"),
        ("kto", "--undesirable-weight 0", "--desirable-weight and --undesirable-weight must be > 0, got 1.0 and 0.0"),
        ("online_dpo", "--num-completions 1", "--num-completions must be >= 2 to form a pair, got 1"),
        ("online_dpo", "--num-completions 0", "--batch-size / --num-completions: sizes must be >= 1, got 64 and 0"),
        ("online_dpo", "--missing-eos-penalty -1", "--reward-gap-threshold and --missing-eos-penalty must be >= 0"),
        ("ppo", "--cliprange 0", "--cliprange, --kl-horizon and --target-kl must be > 0"),
        ("ppo", "--gamma 2", "--gamma and --lam must lie in [0, 1], got 2.0 and 0.95"),
        ("ppo", "--init-kl-coef -1", "--init-kl-coef must be >= 0, got -1.0"),
        ("reinforce", "--kl-coef -1", "--kl-coef must be >= 0, got -1.0"),
        ("grpo", "--beta -1", "--beta must be >= 0 (the KL penalty's weight), got -1.0"),
        ("dpo", "--task bandit_r1 --dataset {d}/pairs8.jsonl", "bandit_r1 is a token bandit with its own true reward; --dataset applies to the length tasks"),
        ("dpo", "--task ultrafeedback", "--task ultrafeedback has no tuned defaults: pass --num-iterations and --learning-rate"),
        ("dpo", "--task ultrafeedback --num-iterations 2 --learning-rate 1e-5", "--task ultrafeedback needs --model"),
    ]
    table += [  # loaders: one line naming the path (the same code for every script)
        ("dpo", "--dataset {d}/missing.jsonl", "dataset file '{d}/missing.jsonl' does not exist: pass an existing .json/.jsonl file"),
        ("dpo", "--dataset {d}/missing_dir/", "dataset directory '{d}/missing_dir/' does not exist"),
        ("dpo", "--dataset {d}/empty.jsonl", "dataset file '{d}/empty.jsonl' is empty"),
        ("dpo", "--dataset {d}/malformed.jsonl", "dataset '{d}/malformed.jsonl': line 3 is not valid JSON"),
        ("dpo", "--dataset {d}/wrong_columns.jsonl", "lacks columns ['prompt', 'chosen', 'rejected']"),
        ("dpo", "--dataset {d}/not_objects.jsonl", "dataset '{d}/not_objects.jsonl': line 2 is not a JSON object"),
        ("dpo", "--dataset {d}/pairs.csv", "cleanpref reads .json/.jsonl files, `save_to_disk` directories and hub ids"),
        ("dpo", "--dataset {d}/no_weights", "(cleanpref reads .json/.jsonl files, `save_to_disk` directories and hub ids)"),
        ("dpo", "--prompts {d}/empty.jsonl", "dataset file '{d}/empty.jsonl' is empty"),
        ("dpo", "--model {d}/empty_model", "model directory '{d}/empty_model' has no config (config.json)"),
        ("dpo", "--model {d}/no_weights", "model directory '{d}/no_weights' has no weights"),
        ("dpo", "--model {d}/no_tokenizer", "model directory '{d}/no_tokenizer' has no tokenizer"),
        ("dpo", "--model {d}/truncated", "cannot load model '{d}/truncated': SafetensorError"),
        ("dpo", "--model {m}/model.safetensors", "model '{m}/model.safetensors' is a file: pass the model's directory"),
        ("dpo", "--reward-model {d}/empty_model", "reward model directory '{d}/empty_model' has no config"),
        ("dpo", "--reward-model {m}", "is not a sequence classifier"),
        ("online_dpo", "--dataset {d}/empty.jsonl", "dataset file '{d}/empty.jsonl' is empty"),
        ("online_dpo", "--prompts {d}/malformed.jsonl", "line 3 is not valid JSON"),
        ("online_dpo", "--model {d}/no_tokenizer", "has no tokenizer"),
        ("ppo", "--gold-reward-model {d}/no_weights", "gold reward model directory '{d}/no_weights' has no weights"),
    ]
    table += [("dpo", "--dataset {d}/pairs8.jsonl --batch-size 64 --minibatch-size 8",  # counted before min_length builds
               "--batch-size 64: --dataset {d}/pairs8.jsonl has 8 preference pairs; pass at most that")]
    table += [
        ("sft", "", "sft.py: pass --model"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column output --minibatch-size 0", "--minibatch-size must be > 0, got 0"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column output --learning-rate -1", "--learning-rate must be > 0"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column output --num-epochs 0", "--num-epochs must be > 0, got 0"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column output --save-every 0", "--save-every must be > 0, got 0"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column nope", "lacks columns ['nope']"),
        ("sft", "--model {m} --dataset {d}/empty.jsonl --response-column output", "dataset file '{d}/empty.jsonl' is empty"),
        ("sft", "--model {m} --dataset {d}/malformed.jsonl", "line 3 is not valid JSON"),
        ("sft", "--model {m} --dataset {d}/demos.jsonl --response-column output --minibatch-size 16", "has 12 demonstrations"),
        ("sft", "--model {d}/empty_model --dataset {d}/demos.jsonl --response-column output --minibatch-size 4", "has no config"),
        ("reward_model", "--model {m} --dataset {d}/prefs.jsonl --eval-fraction 1", "need 0 <= --eval-fraction < 1"),
        ("reward_model", "--model {m} --dataset {d}/prefs.jsonl --max-prompt-length 512", "--max-prompt-length < --max-length"),
        ("reward_model", "--model {d}/no_tokenizer --dataset {d}/prefs.jsonl", "has no tokenizer"),
        ("reward_model", "--model {m} --dataset {d}/empty.jsonl", "is empty"),
        ("reward_model", "--model {m} --dataset {d}/prefs.jsonl --minibatch-size 16", "leaves 11 training pairs"),
    ]
    return table


@pytest.mark.parametrize("script, flags, message", cases(), ids=[f"{c[0]} {c[1]}" for c in cases()])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(script, flags, message, inputs, local_pythia, tmp_path, monkeypatch):
    fill = dict(d=inputs, m=local_pythia[0])
    args = [a.format(**fill) for a in flags.split()]
    if script not in ("sft", "reward_model") and "--task" not in flags:
        args = TASK + args
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path / "cache"))  # an empty cache: every case fails before a build
    out = run(script, tmp_path, *args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert message.format(**fill) in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*/args.json"))
    assert not [a for a in (tmp_path / "cache").glob("[!.]*")], out.stdout[-2000:]  # nothing was built or cached
    if "--model" not in flags:  # a --model's weights are read by the build itself (a damaged file fails there, in one line)
        assert "building" not in out.stdout, out.stdout[-2000:]
    assert not [line for line in out.stdout.splitlines() if line.startswith("run ")]  # no config line for a run that never starts


@pytest.mark.parametrize("flag", ["--num-minibatches 3", "--world-size 2", "--num-prompts 4"])
def test_runtime_fields_are_not_flags(flag, tmp_path):
    """Filled in at run time (and recorded in args.json), so tyro refuses them (its own boxed message, exit code 2)."""
    out = run("online_dpo", tmp_path, "--task", "bandit_r1", *flag.split())
    assert out.returncode == 2 and "Unrecognized options: " + flag.split()[0] in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    assert flag.split()[0] not in run("online_dpo", tmp_path, "--help").stdout


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def test_a_built_cache_is_used_without_writing(tmp_path, monkeypatch):
    """A copy of bandit's built cache whose lock path is a directory: opening the lock for writing fails for every user,
    root included (chmod alone would not stop root), so the task loads only if nothing tries to write; nothing changes."""
    from functools import partial

    from tasks import bandit, cached, make_task, world_seed

    r = dict(bandit.RECIPE, seed=world_seed())  # the recipe make_task uses in this world (CLEANPREF_WORLD_SEED)
    built = cached("bandit", r, partial(bandit._build, r=r))  # the shared cache: built once (about 20 s), else just found
    copy = tmp_path / "cache"
    shutil.copytree(built, copy / built.name)
    (copy / f".{built.name}.lock").mkdir()
    for p in [copy, *copy.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)  # read-only as well, for a non-root user
    before = snapshot(copy)
    monkeypatch.setenv("CLEANPREF_CACHE", str(copy))
    try:
        task = make_task("bandit_r1")
        assert task.load_policy() is not None and len(task.train_prompts) > 0
        assert snapshot(copy) == before
    finally:
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o755)


def test_an_unbuilt_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Unwritable for root too: a cache path under a regular file, and a lock path that is a directory."""
    from tasks import cached

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path / "probe"))
    name = cached("thing", {"a": 1}, lambda d: {}).name  # the artifact's directory name (its key: recipe and kernels)
    (tmp_path / "locked" / f".{name}.lock").mkdir(parents=True)
    for root in (tmp_path / "a_file" / "cache", tmp_path / "locked"):
        monkeypatch.setenv("CLEANPREF_CACHE", str(root))
        with pytest.raises(SystemExit, match=rf"cannot build thing in the cache {root} \(.+\): set CLEANPREF_CACHE to a writable directory"):
            cached("thing", {"a": 1}, lambda d: pytest.fail("built"))


def test_waiting_for_another_build_says_so(tmp_path, monkeypatch, capsys):
    """While another process holds an artifact's build lock, cached() says it waits and for what, then uses that build."""
    from tasks import cached

    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))
    final = cached("thing", {"a": 1}, lambda d: (d / "x").write_text("1") and {})  # learn the artifact's directory
    shutil.rmtree(final)
    lock = open(tmp_path / f".{final.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # "another process": flock locks conflict across open files, also in one process
    result = []
    waiter = threading.Thread(target=lambda: result.append(cached("thing", {"a": 1}, lambda d: (d / "x").write_text("2") and {})),
                              daemon=True)
    waiter.start()
    printed, message = "", f"[cleanpref] waiting for another process to finish building thing ({final})"
    try:
        for _ in range(200):
            printed += capsys.readouterr().out
            if message in printed or not waiter.is_alive():
                break
            time.sleep(0.05)
        assert message in printed, printed
        assert waiter.is_alive() and not final.exists()  # it waits for the lock
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    waiter.join(30)
    assert result == [final] and (final / "x").read_text() == "2"  # then builds it (the other process had not)


@pytest.mark.parametrize("script", ["dpo", "ppo", "best_of_n"])
def test_help_shows_the_per_task_defaults(script, tmp_path):
    """The per-task defaults live in TASK_DEFAULTS; --help prints them (issue 29: it said only `default: None`)."""
    out = run(script, tmp_path, "--help")
    defaults = load_script(script).TASK_DEFAULTS
    assert out.returncode == 0 and "Per-task defaults (TASK_DEFAULTS" in out.stdout
    for task, values in defaults.items():
        assert f"{task}: " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in values.items()) in " ".join(out.stdout.split())
