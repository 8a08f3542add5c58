"""Task registry: everything an objective script needs, behind one small interface.

    task = make_task("skew_length", device)     # builds and caches its artifacts on first use
    policy = task.load_policy()                 # a fresh pi_ref (train it); call again for the frozen reference
    task.train_prompts / task.eval_prompts      # lists of token-id lists (queries)
    task.preference_data                        # datasets.Dataset: prompt, chosen, rejected (text),
                                                #   prompt_ids, chosen_ids, rejected_ids, chosen_score, rejected_score (gold)
    task.proxy_reward(queries, responses)       # [B] what methods optimise (a learned reward model, or the true reward)
    task.gold_reward(queries, responses)        # [B] evaluation only
    task.reward_model_path                      # the proxy reward model's directory (a sequence classifier), or None
                                                #   where the proxy is the true reward (bandit); e.g. to initialise a critic
    task.pad_token_id, task.eos_token_id, task.max_new_tokens, task.temperature, task.tokenizer, task.info

queries are left-padded [B, Lq], responses right-padded [B, Lr] (pad after EOS), both on `device`.
Artifacts live under $CLEANPREF_CACHE (default ~/.cache/cleanpref), one directory per recipe hash; $CLEANPREF_WORLD_SEED
(default 0) is the recipes' seed: another value builds another world (task.info["fingerprint"] names the one in use).

Real data (tasks/real.py): the named tasks `ultrafeedback` and `alpaca_farm` are a --model policy with a hub (or local)
preference dataset and external reward models; on the length tasks, `dataset=` replaces the preference pairs and the
train prompts, `reward_model=` the proxy reward, `gold_reward_model=` the gold one (tasks/preferences.py,
tasks/reward_models.py). The embedded tasks' builds and cache keys do not depend on these.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

# One set of CPU kernels on every x86-64 machine. torch picks its vectorised kernels by the CPU (AVX2, AVX512), and their
# sums round differently: on one machine the length world built with AVX512 kernels had pi_ref 7fdec037c2dd and with AVX2
# ones 66b3c1419658, the world an AVX2 machine builds, and every run differs alike. torch reads this at its first vectorised
# op, so tasks is imported before any tensor op (the scripts do); set ATEN_CPU_CAPABILITY yourself to choose (the cache key
# and the fingerprint then name another world).
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import torch  # noqa: E402
from safetensors import SafetensorError

TaskName = Literal["bandit_r1", "bandit_r2", "min_length", "mode_length", "skew_length", "ultrafeedback", "alpaca_farm"]


@dataclass
class Task:
    name: str
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    policy_path: str  # Hugging Face model directory of pi_ref
    pad_token_id: int
    eos_token_id: Optional[int]  # None: fixed-length responses (bandit)
    max_new_tokens: int
    temperature: float
    train_prompts: list
    eval_prompts: list
    preference_data: object  # datasets.Dataset
    proxy_reward: Callable
    gold_reward: Callable
    device: torch.device = torch.device("cpu")
    reward_model_path: Optional[str] = None  # Hugging Face directory of the proxy reward model, if it is a learned one
    info: dict = field(default_factory=dict)

    def load_policy(self):
        """A fresh copy of pi_ref on the task's device, fp32, dropout off, in eval mode; its embeddings grown to cover the
        tokenizer's pad token where the checkpoint lacks that row (a real task's --model without a pad token)."""
        from transformers import AutoModelForCausalLM

        from common import disable_dropout

        try:
            model = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=torch.float32)
        except LOAD_ERRORS as err:
            raise _hub_error(self.policy_path, "model", err) from None
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:  # grow only, as _with_pad_token does
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        model.config.pad_token_id = self.pad_token_id
        return disable_dropout(model.to(self.device)).eval()

    def decode(self, ids):
        return self.tokenizer.decode([i for i in ids if i != self.pad_token_id], skip_special_tokens=True)


def make_task(name: str, device="cpu", model: Optional[str] = None, prompts: Optional[str] = None, dataset: Optional[str] = None,
              reward_model: Optional[str] = None, gold_reward_model: Optional[str] = None, max_prompt_length: Optional[int] = None,
              max_length: Optional[int] = None, min_pairs: int = 0) -> Task:
    """Build (or load from cache) task `name`. model: replace the embedded pi_ref with a Hugging Face
    causal LM (local directory or hub id; length tasks); prompts: a dataset of prompts to use instead
    of the embedded ones (a `prompt` column, or AlpacaFarm's `instruction` [+ `input`]).
    dataset: preference pairs replacing the task's (and its prompts the train prompts); reward_model / gold_reward_model:
    Hugging Face sequence classifiers replacing the proxy / gold reward; max_prompt_length / max_length: truncation of the
    dataset's rows (tasks/preferences.py); min_pairs: the pairs an offline script draws per iteration, so that a --dataset
    with fewer rows fails before the embedded task builds. The real tasks (ultrafeedback, alpaca_farm) need model and
    reward_model."""
    import importlib

    from tasks import real

    _quiet_transformers()
    modules = {"bandit_r1": "bandit", "bandit_r2": "bandit", "min_length": "length", "mode_length": "length",
               "skew_length": "length", "ultrafeedback": "real", "alpaca_farm": "real"}
    if name not in modules:
        raise SystemExit(f"unknown task {name!r}: choose one of {', '.join(modules)}")
    real_data = dict(dataset=dataset, reward_model=reward_model, gold_reward_model=gold_reward_model,
                     max_prompt_length=max_prompt_length, max_length=max_length)
    if modules[name] == "real":
        return real.make(name, torch.device(device), model, prompts, **real_data)
    real.check_overrides(name, **real_data, min_pairs=min_pairs)  # one-line errors before the embedded task builds
    if modules[name] == "length" and model is not None:
        _resolve(model, "model")
    if modules[name] == "length" and prompts is not None:
        load_split(prompts, "train")
    task = importlib.import_module(f"tasks.{modules[name]}").make(name, torch.device(device), model, prompts)
    return real.override(task, **real_data)


def cache_root() -> Path:
    return Path(os.environ.get("CLEANPREF_CACHE") or Path.home() / ".cache" / "cleanpref")


def world_seed() -> int:
    """The seed of the embedded tasks' worlds (their recipes' `seed`, so part of the cache key): $CLEANPREF_WORLD_SEED,
    default 0. Another seed builds another world from the same recipe (another pi_ref, prompts, data and reward model),
    to see whether a result depends on the one world a machine builds (docs/tasks.md)."""
    value = os.environ.get("CLEANPREF_WORLD_SEED", "0")
    if not value.isdigit():
        raise SystemExit(f"CLEANPREF_WORLD_SEED must be a whole number >= 0, got {value!r}")
    return int(value)


def fingerprint(directory: Path, **stats) -> dict:
    """What names a built world: its seed, `stats` (pi_ref's length mode, EOS rate, mean gold reward of its samples...)
    and the first 12 hex digits of the sha256 of pi_ref's weights, from the cache's manifest. Builds on other machines
    differ slightly (floating point grows through training); the fingerprint tells which world a result came from."""
    files = json.loads((directory / "manifest.json").read_text())["files"]
    weights = next(h for f, h in sorted(files.items()) if f.startswith("policy/") and f.endswith((".safetensors", ".bin")))
    return {"world_seed": world_seed(), **stats, "pi_ref_sha256": weights[:12]}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(directory: Path) -> bool:
    manifest = directory / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {"manifest.json"}
        return present == set(files) and all(_digest(directory / f) == h for f, h in files.items())
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _saves_on_this_rank():
    """Under torchrun, whichever rank takes a cache's lock builds it alone; transformers' save_pretrained writes nothing on
    ranks other than 0 of an initialised process group, which would leave a cache without its model files."""
    from transformers import PreTrainedModel

    rule = PreTrainedModel.should_save_on_this_rank
    PreTrainedModel.should_save_on_this_rank = lambda self, is_main_process: is_main_process
    try:
        yield
    finally:
        PreTrainedModel.should_save_on_this_rank = rule


@contextlib.contextmanager
def _one_thread():
    """A build's floating-point sums depend on how torch splits them over threads, and the differences grow through its
    training (2 threads built another pi_ref, with 1624 skew pairs instead of 1617): every build runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cached(kind: str, recipe: dict, build: Callable[[Path], dict]) -> Path:
    """Directory of artifacts for `recipe`, built by build(tmp_dir) -> summary dict if absent or damaged.

    The build writes into a temporary sibling directory that is renamed into place only when complete
    (with a manifest of sha256 digests), so a killed build never leaves a cache that loads, and a
    cache whose files were changed or removed is detected and rebuilt. A lock file per artifact makes
    concurrent processes (the study's workers, parallel test workers) wait for one build, not repeat it.
    """
    root = cache_root()
    kernels = torch.backends.cpu.get_cpu_capability()  # part of the key: other kernels build another world (see the top)
    key = hashlib.sha256(json.dumps(dict(recipe, kernels=kernels), sort_keys=True).encode()).hexdigest()[:16]
    final = root / f"{kind}-{key}"
    if _intact(final):  # built: used as it is, nothing written (a read-only cache can be shared)
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{kind}-{key}.lock", "w")
    except OSError as err:
        raise SystemExit(f"cannot build {kind} in the cache {root} ({err.strerror}): set CLEANPREF_CACHE to a writable directory "
                         f"(or build it once where the cache is writable)") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, also if this process dies
        except BlockingIOError:
            print(f"[cleanpref] waiting for another process to finish building {kind} ({final})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            if _intact(final):
                return final
            print(f"[cleanpref] cache {final} is damaged or partial: rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".building-{kind}-"))
        print(f"[cleanpref] building {kind} (first use: trains what it needs, then loads from {root})", flush=True)
        try:
            start = time.time()
            # builds seed themselves (a run must not depend on whether its cache was warm), run on one thread (the world must
            # not depend on --threads) and save on whichever rank builds
            with torch.random.fork_rng(), _one_thread(), _saves_on_this_rank():
                summary = build(tmp)
            files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / "manifest.json").write_text(json.dumps({"recipe": recipe, "summary": summary, "files": files}, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    stats = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    weights = [h[:12] for f, h in files.items() if f.startswith("policy/") and f.endswith((".safetensors", ".bin"))]
    print(f"[cleanpref] built {kind} in {time.time() - start:.0f}s -> {final} ({stats}{', pi_ref_sha256=' + weights[0] if weights else ''})")
    return final


def step_bar(desc: str, unit: str = "step"):
    """A `progress(step, total, loss=None)` callback, as `sft_train` and `reward_model_train` take: builds and the
    standalone scripts show their steps instead of a silent minute. On a terminal it drives a tqdm bar on stderr;
    written to a file or a pipe (a bar's carriage returns make one long line there) it prints a plain line at most
    every 15 seconds, and the last step's."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True)

        def progress(step, total, loss=None):
            bar.total = total
            bar.update(step - bar.n)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step >= total:
                bar.close()

        return progress
    last = time.time()

    def progress(step, total, loss=None):
        nonlocal last
        if step >= total or time.time() - last >= 15:
            last = time.time()
            print(f"[cleanpref] {desc}: {step}/{total}" + ("" if loss is None else f", loss {loss:.3f}"), file=sys.stderr, flush=True)

    return progress


def summary_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())["summary"]


MODEL_FILES = {"config": ["config.json"], "weights": ["*.safetensors", "pytorch_model*.bin"],
               "tokenizer": ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt"]}
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)  # what from_pretrained raises for files it cannot read


def _resolve(path_or_id: str, what: str) -> str:
    """A local path, or a hub id to try; one-line errors for local paths that do not exist (a file where one was meant,
    else a directory) and for model directories without a config, weights or a tokenizer."""
    p = Path(path_or_id).expanduser()
    if p.exists() and "model" in what:  # a model, reward model or gold reward model
        if not p.is_dir():
            raise SystemExit(f"{what} {path_or_id!r} is a file: pass the model's directory (save_pretrained's output)")
        for part, patterns in MODEL_FILES.items():
            if not any(next(p.glob(pattern), None) for pattern in patterns):
                raise SystemExit(f"{what} directory {path_or_id!r} has no {part} ({' or '.join(patterns)}): not a whole saved model; "
                                 f"save it with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
    if p.exists():
        return str(p)
    if p.suffix in (".json", ".jsonl"):
        raise SystemExit(f"{what} file {path_or_id!r} does not exist: pass an existing .json/.jsonl file (or a directory, or a hub id)")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or os.sep in path_or_id.replace("/", "", 1):
        raise SystemExit(f"{what} directory {path_or_id!r} does not exist: pass an existing directory (or a hub id)")
    return path_or_id


def source_key(path_or_id: Optional[str]):
    """What identifies a model or dataset in a cache recipe: a hub id as given; a local path made absolute,
    with its files' sizes and modification times, so that retraining a model in place rebuilds."""
    if path_or_id is None or not Path(path_or_id).expanduser().exists():
        return path_or_id
    p = Path(path_or_id).expanduser().resolve()
    files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return [str(p)] + [(str(f.relative_to(p.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _hub_error(path_or_id, what, err):
    """The one-line error for a model or dataset that did not load: a local one's own error, or the hub's absence."""
    if Path(path_or_id).expanduser().exists():
        return SystemExit(f"cannot load {what} {path_or_id!r}: {_first_line(err)} (a partial or damaged save? save it again)")
    return SystemExit(f"cannot load {what} {path_or_id!r}: it is not a local path and the Hugging Face hub is not "
                      f"reachable ({type(err).__name__}); download it where there is network and pass the local path")


def _first_line(err) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:300]


def _quiet_transformers():
    """No transformers progress bars ("Loading weights" on every from_pretrained would bury the logs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _with_pad_token_id(tokenizer):
    """Give a policy's tokenizer a dedicated pad token (distinct from EOS): "[PAD]", added where it has none."""
    if tokenizer.eos_token_id is None:
        raise SystemExit("the tokenizer has no EOS token: responses could never end; set tokenizer.eos_token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def _with_pad_token(model, tokenizer):
    """Give the tokenizer a dedicated pad token (distinct from EOS), growing the embeddings if needed."""
    tokenizer = _with_pad_token_id(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # grow only: Pythia pads its matrix to 50304 rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the pad row is never attended nor sampled
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load(auto_class, path_or_id: str, what: str, device, **kwargs):
    """(model, tokenizer) from a local directory or hub id: fp32 weights for Adam whatever the
    checkpoint's dtype, a dedicated pad token, dropout off."""
    from transformers import AutoTokenizer

    from common import disable_dropout

    _quiet_transformers()
    src = _resolve(path_or_id, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = auto_class.from_pretrained(src, dtype=torch.float32, **kwargs)
    except LOAD_ERRORS as err:
        raise _hub_error(path_or_id, what, err) from None
    model, tokenizer = _with_pad_token(model, tokenizer)
    return disable_dropout(model).to(device).eval(), tokenizer


def load_causal_lm(path_or_id: str, device="cpu"):
    """(model, tokenizer) of a Hugging Face causal LM."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path_or_id, "model", device)


def load_reward_model(path_or_id: str, device="cpu"):
    """(sequence classifier with one output, tokenizer), e.g. initialised from an SFT policy."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal LM checkpoint lacks the new score head: expected, not news
    try:
        return _load(AutoModelForSequenceClassification, path_or_id, "reward model", device, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)


def parse_dataset_spec(path_or_id: str):
    """(local path or hub id, config or None, split or None) of a dataset written `path`, `id`, `id:config` or
    `id:config@split` (a local path is taken whole when it exists)."""
    if Path(path_or_id).expanduser().exists():
        return path_or_id, None, None
    path_or_id, _, split = path_or_id.partition("@")
    path_or_id, _, config = path_or_id.partition(":")
    return path_or_id, config or None, split or None


def _open_dataset(path_or_id: str, split: Optional[str]):
    """A Dataset (a file, a saved Dataset, or the hub with `split`) or a DatasetDict (a saved one; the hub without split)."""
    import datasets

    path_or_id, config, _ = parse_dataset_spec(path_or_id)
    src = _resolve(path_or_id, "dataset")
    if Path(src).is_file() and not src.endswith((".json", ".jsonl")):
        raise SystemExit(f"dataset file {path_or_id!r}: cleanpref reads .json/.jsonl files, `save_to_disk` directories and hub ids")
    if Path(src).is_file() and not open(src, errors="replace").read(1 << 16).strip():
        raise SystemExit(f"dataset file {path_or_id!r} is empty: it needs one JSON object per line (.jsonl) or a JSON list of them")
    verbosity = datasets.logging.get_verbosity()
    if Path(src).exists():  # local data reads in seconds: no bars; what goes wrong is ours to explain
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if src.endswith((".json", ".jsonl")):
            return datasets.load_dataset("json", data_files=src, split="train")
        if any(Path(src, f).exists() for f in ("state.json", "dataset_dict.json")):  # save_to_disk output
            return datasets.load_from_disk(src)
        return datasets.load_dataset(src, config, split=split)
    except (OSError, ConnectionError, ValueError) as err:
        raise _hub_error(path_or_id, "dataset", err) from None
    except datasets.exceptions.DatasetGenerationError as err:  # a file datasets cannot parse: which line, if JSON is the cause
        raise SystemExit(f"dataset {path_or_id!r}: " + (_json_problem(src) or f"{_first_line(err.__cause__ or err)} (cleanpref reads .json/.jsonl "
                                                          f"files, `save_to_disk` directories and hub ids)")) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _json_problem(path: str) -> Optional[str]:
    """Where a .json/.jsonl file stops being rows: one JSON list of objects, or one object per line."""
    if not path.endswith((".json", ".jsonl")):
        return None
    text = Path(path).read_text()
    try:
        rows = json.loads(text)
        return None if not isinstance(rows, list) or all(isinstance(r, dict) for r in rows) else "its list holds items that are not JSON objects"
    except ValueError as whole:
        if text.lstrip().startswith("["):
            return f"line {whole.lineno} is not valid JSON ({whole.msg}): fix it"
    for i, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip() and not isinstance(json.loads(line), dict):
                return f"line {i} is not a JSON object: fix or remove that line"
        except ValueError as err:
            return f"line {i} is not valid JSON ({err.msg}): fix or remove that line"
    return None


def dataset_splits(path_or_id: str) -> list:
    """The split names of a dataset spec: a file or a saved Dataset has one, `train`."""
    import datasets

    src, config, _ = parse_dataset_spec(path_or_id)
    if Path(src).expanduser().exists():
        ds = _open_dataset(src, None)
        return list(ds) if isinstance(ds, datasets.DatasetDict) else ["train"]
    try:
        return datasets.get_dataset_split_names(_resolve(src, "dataset"), config)
    except (OSError, ConnectionError, ValueError) as err:
        raise _hub_error(src, "dataset", err) from None


def load_split(path_or_id: str, split: str):
    """One split (a datasets.Dataset) of a local .json/.jsonl file, a `save_to_disk` directory, or a hub dataset,
    written `id`, `id:config` or `id:config@split` (e.g. tatsu-lab/alpaca_farm:alpaca_instructions@unlabeled);
    `@split` overrides `split`."""
    import datasets

    split = parse_dataset_spec(path_or_id)[2] or split
    ds = _open_dataset(path_or_id, split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SystemExit(f"dataset {path_or_id!r} has no split {split!r}: choose one of {', '.join(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise SystemExit(f"dataset {path_or_id!r} ({split}) has no rows")
    return ds


def load_rows(path_or_id: str, split: str, columns: list) -> list:
    """Rows (dicts) of one split of a dataset (see `load_split`), after checking it has `columns`."""
    ds = load_split(path_or_id, split)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SystemExit(f"dataset {path_or_id!r} lacks columns {missing}; it has {ds.column_names}")
    return list(ds)


def prompt_text(row: dict, column: str = "prompt") -> str:
    """The prompt of a dataset row: its `column`, or else AlpacaFarm's `instruction` [+ `input`] in the
    study's Pythia-SFT template (docs/paper.md 3c)."""
    if column in row:
        return row[column]
    if "instruction" in row:
        return "<|prompter|>" + row["instruction"] + (f"\n{row['input']}" if row.get("input") else "") + "<|endoftext|><|assistant|>"
    raise SystemExit(f"prompts need a {column!r} column or AlpacaFarm's `instruction` [+ `input`]; the data has {list(row)}")
