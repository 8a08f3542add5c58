"""Embedded tasks: the worlds have the geometry the study needs, rewards are right, the cache is safe."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from common import generate, pad_rows
from conftest import ROOT
from tasks import _with_pad_token, cache_root, cached, load_rows, make_task, prompt_text, summary_of
from tasks.bandit import PAD, bandit_reward, pi_data
from tasks.length import gold_length_reward, length_pmf, response_lengths, skew_truncate


@pytest.fixture(scope="session")
def bandit():
    return make_task("bandit_r1")


@pytest.fixture(scope="session")
def length_tasks():
    return {name: make_task(name) for name in ("min_length", "mode_length", "skew_length")}


def test_pi_data_shape():
    p = pi_data()
    assert p.shape == (100,) and abs(p.sum() - 1) < 1e-12
    assert 10 <= int(np.argmax(p[5:95])) + 5 <= 25  # interior mode near token 16-20
    assert p[0] > p[1] and p[99] > p[98]  # spikes at both ends
    assert p[70] < 0.005


def test_bandit_reward_on_hand_made_sequences():
    y = torch.tensor([[70] * 9, [20] * 9, [80] * 9, [70] * 4 + [0] * 5])
    r1 = bandit_reward(torch.tensor([[5]] * 4), y, 70.0)
    expected = [1.0, float(np.exp(-25)), float(np.exp(-1)), (4 + 5 * float(np.exp(-49))) / 9]
    torch.testing.assert_close(r1, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # the prompt never counts: the same response under another prompt has the same reward
    torch.testing.assert_close(bandit_reward(torch.tensor([[70]] * 4), y, 70.0), r1)


def test_bandit_pi_ref_matches_pi_data_at_every_position(bandit):
    policy = bandit.load_policy()
    q = pad_rows([[i] for i in range(100)], PAD, left=True)
    y, _ = generate(policy, q, PAD, None, 9, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = policy(torch.cat([q, y[:, :-1]], 1)).logits[:, :, :100]  # next-token at positions 0..8
    target = torch.tensor(pi_data(), dtype=torch.float32)
    tv = 0.5 * (torch.softmax(logits, -1) - target).abs().sum(-1)
    assert tv.max() < 0.05, tv.max()


def test_bandit_geometry_r2_likely_r1_unlikely(bandit):
    policy = bandit.load_policy()
    q = pad_rows([[i % 100] for i in range(1000)], PAD, left=True)
    y, _ = generate(policy, q, PAD, None, 9, 1.0, torch.Generator().manual_seed(1))
    r1, r2 = bandit_reward(q, y, 70.0).mean(), bandit_reward(q, y, 20.0).mean()
    assert r2 > 5 * r1 and r1 < 0.08 and r2 > 0.3, (r1, r2)
    data = bandit.preference_data
    assert len(data) > 400 and all(c > r for c, r in zip(data["chosen_score"], data["rejected_score"]))


def test_bandit_peak_shares_r1_rare_r2_likely(bandit):
    # pi_ref's per-token mass within 5 of mu: near pi_data's own (pi_ref fits it), and R1's peak >= 5x rarer than R2's
    r1, r2 = bandit.info["ref_peak_share"], make_task("bandit_r2").info["ref_peak_share"]
    p = pi_data()
    assert abs(r1 - p[65:76].sum()) < 0.005 and abs(r2 - p[15:26].sum()) < 0.02, (r1, r2)
    assert r1 <= r2 / 5
    summary = summary_of(Path(bandit.policy_path).parent)  # what the build recorded and printed
    assert (summary["ref_peak_share_bandit_r1"], summary["ref_peak_share_bandit_r2"]) == (r1, r2)


def test_length_peaks_rare_for_min_and_skew_likely_for_mode(length_tasks):
    # claims 1 and 7: min_length's optimum (the empty response) lies where pi_ref is really unlikely (R1's analogue),
    # mode_length's (pi_ref's modal length) where it is likely (R2's); skew_length has min_length's pi_ref and optimum
    share = {name: t.info["ref_peak_share"] for name, t in length_tasks.items()}
    assert 0 < share["min_length"] <= 0.002 and share["mode_length"] >= 20 * share["min_length"], share
    assert share["skew_length"] == share["min_length"]
    world = summary_of(Path(length_tasks["min_length"].policy_path).parent)
    assert (world["ref_peak_share_empty"], world["ref_peak_share_mode"]) == (share["min_length"], share["mode_length"])
    for name, t in length_tasks.items():  # each task's build recorded (and printed) its own
        assert summary_of(Path(t.reward_model_path).parent)["ref_peak_share"] == share[name]


def test_length_pmf_is_pi_refs_stopping_probability_along_its_samples(length_tasks):
    t = length_tasks["min_length"]
    policy, pad, eos = t.load_policy(), t.pad_token_id, t.eos_token_id
    q = pad_rows(t.eval_prompts[:6], pad, left=True)
    y, _ = generate(policy, q, pad, eos, 24, 1.0, torch.Generator().manual_seed(0))
    pmf, lengths = length_pmf(policy, q, y, pad, eos, y.shape[1] + 2), response_lengths(y, pad, eos)
    assert pmf.shape == (6, y.shape[1] + 2) and (pmf[:, y.shape[1]:] == 0).all()
    for i, prompt in enumerate(t.eval_prompts[:6]):
        for k in range(y.shape[1]):  # P(stop at k | the sample's first k tokens) until the sample stopped, then 0
            with torch.no_grad():
                logits = policy(torch.tensor([prompt + y[i, :k].tolist()])).logits[0, -1]
            expected = torch.softmax(logits.index_fill(0, torch.tensor([pad]), -torch.inf), -1)[eos] if k <= lengths[i] else 0.0
            torch.testing.assert_close(pmf[i, k], torch.as_tensor(expected), atol=1e-6, rtol=1e-4)


def test_length_pi_ref_stops_and_has_a_spread_length_distribution(length_tasks):
    info = length_tasks["min_length"].info
    assert info["eos_rate"] > 0.97  # pi_ref ends its responses
    assert 12 <= info["length_mode"] <= 30 and info["length_mean"] > info["length_mode"]  # a mode, and a long tail
    assert info["length_std"] > 8


def test_gold_length_rewards_on_hand_made_responses(length_tasks):
    t = length_tasks["mode_length"]
    pad, eos, mode = t.pad_token_id, t.eos_token_id, t.info["length_mode"]
    y = pad_rows([[7] * 5 + [eos], [eos], [7] * 3 + [eos, 7, 7], [7] * 64], pad, left=False)
    assert gold_length_reward(None, y, pad, eos).tolist() == [-5, 0, -3, -64]  # never-ended: all 64 count
    assert gold_length_reward(None, y, pad, eos, mode).tolist() == [-abs(n - mode) for n in (5, 0, 3, 64)]
    torch.testing.assert_close(t.gold_reward(None, y), gold_length_reward(None, y, pad, eos, mode))


def test_skew_truncation_rule():
    import random

    period, eos = 3, 1
    y = [9, 9, period, 9, period, 9, 9, 9, period, 9, period, eos]  # 4 sentences
    cut = [skew_truncate(y, period, eos, random.Random(s), 0.5) for s in range(50)]
    assert all(c[-1] == eos and c[-2] == period and c[:-1] == y[: len(c) - 1] for c in cut)
    assert {c.count(period) for c in cut} == {1}  # floor(u * 4) with u < 0.5 keeps 1 sentence


def test_skew_data_is_shorter_and_proxy_models_beat_chance(length_tasks):
    skew, full = length_tasks["skew_length"].info, length_tasks["min_length"].info
    assert skew["data_length_mean"] < 0.5 * full["length_mean"]
    for name, t in length_tasks.items():
        print(f"{name}: proxy RM held-out pairwise accuracy {t.info['rm_heldout_accuracy']:.3f} on {t.info['pairs']} pairs")
        assert t.info["rm_heldout_accuracy"] > 0.9  # far above chance (0.5) in every world: 0.947 at least on world 1, 0.99 on world 0
        d = t.preference_data
        assert all(c > r for c, r in zip(d["chosen_score"], d["rejected_score"]))  # ordered, ties dropped


def test_reward_model_path_holds_the_proxy_reward_model(length_tasks, bandit):
    from transformers import AutoModelForSequenceClassification

    from algos.reward_model import reward_scores

    t = length_tasks["skew_length"]
    d = t.preference_data[:6]
    q = pad_rows(d["prompt_ids"], t.pad_token_id, left=True)
    y = pad_rows(d["chosen_ids"], t.pad_token_id, left=False)
    rm = AutoModelForSequenceClassification.from_pretrained(t.reward_model_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, q, y, t.pad_token_id), t.proxy_reward(q, y))
    assert bandit.reward_model_path is None  # the bandit's proxy is the true reward: no model


def test_cache_loads_without_rebuilding_and_rebuilds_when_damaged(bandit, monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))
    calls = []

    def build(out):
        calls.append(1)
        (out / "a.json").write_text(json.dumps({"x": len(calls)}))
        return {"n": len(calls)}

    d = cached("toy", {"v": 1}, build)
    assert cached("toy", {"v": 1}, build) == d and len(calls) == 1  # loaded, not rebuilt
    (d / "a.json").write_text("garbage")  # corrupted
    assert cached("toy", {"v": 1}, build) == d and len(calls) == 2
    (d / "a.json").unlink()  # partial
    cached("toy", {"v": 1}, build)
    assert len(calls) == 3 and json.loads((d / "a.json").read_text()) == {"x": 3}
    cached("toy", {"v": 2}, build)  # a changed recipe is another entry
    assert len(calls) == 4


def test_a_build_runs_on_one_thread_whatever_the_callers_count(monkeypatch, tmp_path):
    """The world must not depend on --threads: 2 threads during the length build gave another pi_ref (1624 vs 1617 pairs)."""
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        cached("toy", {"v": 1}, lambda out: seen.append(torch.get_num_threads()) or {})
        assert seen == [1] and torch.get_num_threads() == 2  # built on one thread, the caller's count restored
    finally:
        torch.set_num_threads(before)


def test_kernels_are_pinned_and_part_of_the_cache_key(monkeypatch, tmp_path):
    """An AVX512 machine built another world than an AVX2 one (pi_ref 7fdec037c2dd vs 66b3c1419658): on x86-64, importing
    tasks pins ATen's AVX2 kernels, and a process with other kernels gets another cache entry, never the same one."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import torch, tasks; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    kernels = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert kernels == "AVX2"
    assert torch.backends.cpu.get_cpu_capability() == kernels  # the tests run the scripts' kernels (conftest imports tasks first)
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))
    ours = cached("toy", {"v": 1}, lambda out: {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if kernels != "AVX512" else "AVX2")
    assert cached("toy", {"v": 1}, lambda out: {}) != ours


def test_a_build_leaves_the_global_rng_alone(monkeypatch, tmp_path):
    # a run that builds its task (cold cache) must train exactly like one that loads it (warm cache)
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    def build(out):
        torch.manual_seed(0)
        torch.rand(5)
        return {}

    cached("toy", {"v": 1}, build)
    assert torch.equal(torch.rand(3), expected)


def test_killed_build_leaves_nothing_that_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path))

    def dies(out):
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached("toy", {"v": 1}, dies)
    assert [p.name for p in cache_root().iterdir() if p.suffix != ".lock"] == []


def test_concurrent_processes_build_once(tmp_path):
    # the study's workers and parallel test workers start on a cold cache together: one builds, the others wait and load
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tasks import cached\n"
            "def build(out):\n    open(sys.argv[2], 'a').write('built\\n'); time.sleep(1.0); (out / 'a').write_text('x'); return {}\n"
            "print(cached('toy', {'v': 1}, build))")
    env = dict(os.environ, CLEANPREF_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path / "log")], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate()[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    assert (tmp_path / "log").read_text() == "built\n"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown task 'min_lenght'"):
        make_task("min_lenght")
    with pytest.raises(SystemExit, match="does not exist"):
        make_task("min_length", model=str(tmp_path / "no_such_model"))
    with pytest.raises(SystemExit, match="hub is not reachable"):
        make_task("min_length", model="nobody/no-such-model-cleanpref")
    with pytest.raises(SystemExit, match="length tasks"):
        make_task("bandit_r1", model=str(tmp_path))


def test_local_model_and_prompts_replace_the_embedded_world(local_pythia, monkeypatch):
    model_dir, prompts, cache = local_pythia
    monkeypatch.setenv("CLEANPREF_CACHE", str(cache))
    t = make_task("min_length", model=str(model_dir), prompts=str(prompts))
    assert t.pad_token_id == len(t.tokenizer) - 1 != t.eos_token_id  # a dedicated pad token was added
    assert t.max_new_tokens == 256
    policy = t.load_policy()
    assert type(policy).__name__ == "GPTNeoXForCausalLM" and policy.dtype == torch.float32  # fp16 on disk
    assert policy.get_input_embeddings().num_embeddings == len(t.tokenizer)  # grown by the pad row
    # the prompts are the file's rows in the AlpacaFarm template: the first fifth held out for evaluation
    rows = [json.loads(line) for line in open(prompts)]
    texts = ["<|prompter|>" + r["instruction"] + (f"\n{r['input']}" if r["input"] else "") + "<|endoftext|><|assistant|>" for r in rows]
    assert t.eval_prompts + t.train_prompts == [t.tokenizer(x)["input_ids"] for x in texts] and len(t.eval_prompts) == 12
    # a uniform sampler over V tokens stops with probability 1/V per token: most of 256 tokens end
    assert 0.8 < t.info["eos_rate"] < 1.0 and t.info["length_mean"] > 20
    d = t.preference_data
    assert 30 <= len(d) <= 48 and 0.0 <= t.info["rm_heldout_accuracy"] <= 1.0
    for c, r, cs, rs in zip(d["chosen_ids"], d["rejected_ids"], d["chosen_score"], d["rejected_score"]):
        assert cs > rs and cs == -(len(c) - (c[-1] == t.eos_token_id))  # min_length gold: tokens before EOS
    q = pad_rows(d["prompt_ids"][:4], t.pad_token_id, left=True)
    y = pad_rows(d["chosen_ids"][:4], t.pad_token_id, left=False)
    assert t.proxy_reward(q, y).shape == (4,) and torch.isfinite(t.proxy_reward(q, y)).all()
    assert make_task("min_length", model=str(model_dir), prompts=str(prompts)).info == t.info  # cached


def test_pad_token_is_added_without_shrinking_a_padded_embedding_matrix():
    from tokenizers import Tokenizer, models
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0")),
                                  eos_token="w1")
    cfg = GPTNeoXConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model, tok = _with_pad_token(GPTNeoXForCausalLM(cfg), tok)  # like Pythia: 50277 tokens, 50304 rows
    assert tok.pad_token_id == 40 and model.get_input_embeddings().num_embeddings == 48 and model.config.pad_token_id == 40
    tok.add_special_tokens({"additional_special_tokens": [f"x{i}" for i in range(10)]})
    model, tok = _with_pad_token(model, tok)  # 51 tokens now: grown
    assert tok.pad_token_id == 40 and model.get_input_embeddings().num_embeddings == 51


def test_dataset_specs_and_prompt_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANPREF_CACHE", str(tmp_path / "cache"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "b"}, {"prompt": "c"}])})
    dd.save_to_disk(tmp_path / "dd")
    assert load_rows(str(tmp_path / "dd"), "train", ["prompt"]) == [{"prompt": "a"}]
    assert load_rows(str(tmp_path / "dd") + "@test", "train", ["prompt"]) == [{"prompt": "b"}, {"prompt": "c"}]
    with pytest.raises(SystemExit, match="has no split 'val': choose one of train, test"):
        load_rows(str(tmp_path / "dd") + "@val", "train", [])
    with pytest.raises(SystemExit, match="hub is not reachable"):
        load_rows("nobody/no-such-data-cleanpref:config@split", "train", [])
    (tmp_path / "bad.jsonl").write_text('{"question": "hi"}\n')
    with pytest.raises(SystemExit, match="need a 'prompt' column or AlpacaFarm's `instruction`"):
        make_task("min_length", prompts=str(tmp_path / "bad.jsonl"))
    assert prompt_text({"instruction": "add", "input": "1 2"}) == "<|prompter|>add\n1 2<|endoftext|><|assistant|>"
    assert prompt_text({"instruction": "add", "input": "", "prompt": "x"}) == "x"


def test_world_seed_changes_the_recipes_seed_and_nothing_else(monkeypatch):
    """CLEANPREF_WORLD_SEED is the recipes' seed: another value is another cache key and another world, built from the same
    recipe otherwise; the default (0) keeps the key every cache had before (issue 27, item 8)."""
    from tasks import bandit, length

    class Stop(Exception):
        pass

    seen = {}

    def fake_cached(kind, recipe, build):
        seen.setdefault(os.environ["CLEANPREF_WORLD_SEED"], {})[kind] = recipe
        raise Stop

    for module in (bandit, length):
        monkeypatch.setattr(module, "cached", fake_cached)
    for ws in ("0", "7"):
        monkeypatch.setenv("CLEANPREF_WORLD_SEED", ws)
        for module, name in ((bandit, "bandit_r1"), (length, "min_length")):
            with pytest.raises(Stop):
                module.make(name, torch.device("cpu"))
    for kind in ("bandit", "length-world"):
        a, b = seen["0"][kind], seen["7"][kind]
        assert {k for k in a if a[k] != b[k]} == {"seed"} and (a["seed"], b["seed"]) == (0, 7), (a, b)
    assert seen["0"]["bandit"] == bandit.RECIPE and seen["0"]["length-world"]["seed"] == length.RECIPE["seed"] == 0
    monkeypatch.setenv("CLEANPREF_WORLD_SEED", "one")
    with pytest.raises(SystemExit, match="CLEANPREF_WORLD_SEED must be a whole number >= 0, got 'one'"):
        bandit.make("bandit_r1", torch.device("cpu"))


def test_a_task_names_its_world(bandit, length_tasks):
    """task.info['fingerprint']: the world seed, pi_ref's length mode and EOS rate (length tasks), the mean gold of its
    samples, and its weights' hash, the same for every task of one world."""
    fps = {name: t.info["fingerprint"] for name, t in length_tasks.items()}
    assert len({json.dumps(fp, sort_keys=True) for name, fp in fps.items() if name != "mode_length"}) == 1  # one world
    fp = fps["min_length"]
    assert fp["world_seed"] == int(os.environ.get("CLEANPREF_WORLD_SEED", "0")) and len(fp["pi_ref_sha256"]) == 12
    assert fp["length_mode"] == length_tasks["min_length"].info["length_mode"] and fp["pi_ref_sha256"] == fps["mode_length"]["pi_ref_sha256"]
    assert -40 < fp["gold_of_samples"] < -15 and fps["mode_length"]["gold_of_samples"] > fp["gold_of_samples"]  # -|len - mode| > -len
    assert 0 < bandit.info["fingerprint"]["gold_of_samples"] < 0.1 and bandit.info["fingerprint"]["pi_ref_sha256"] != fp["pi_ref_sha256"]
