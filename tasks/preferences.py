"""Preference datasets from the hub or local files, tokenised for a policy: what `--dataset` reads.

Rows in any of these schemas (the first that fits the columns is used):
- `chosen`, `rejected` as chat message lists (UltraFeedback binarized: `prompt`, `chosen`, `rejected`, `messages`,
  `score_chosen`, `score_rejected`; splits `train_prefs` / `test_prefs`). The prompt is every message before the final
  assistant turn (it must be the same in both lists and that turn must be the assistant's, else the row is malformed).
- `prompt`, `chosen`, `rejected` as text; optional scores `score_chosen`/`score_rejected` or `chosen_score`/`rejected_score`.
- AlpacaFarm's pairwise preferences: `instruction`, `input`, `output_1`, `output_2`, `preference` (1 or 2; anything
  else is a tie). The prompt is the study's Pythia-SFT template (`tasks.prompt_text`).
- The study's relabelled AlpacaFarm data (Asap7772/relabeled_alpacafarm_pythiasft_20K_preference_data*): `prompt`,
  `y_w`, `y_l` (prompt + response text), `y_w_score`, `y_l_score`; the response is the text after the prompt (where
  y_w / y_l do not start with it verbatim: after their last `<|assistant|>`, as the study's code splits them).

Rendering and tokenisation (`transformers`, as TRL's DPO does it):
- A message-list prompt is rendered by the tokenizer's chat template with the generation prompt, and tokenised without
  added special tokens (the template writes its own). The response is the rest of the rendered conversation: the text
  the template writes after that prompt, i.e. exactly the final assistant turn, tokenised on its own. With `chat=True`
  (the ultrafeedback task) a text prompt becomes one user message and goes the same way.
- A text prompt (chat=False) is used verbatim: tokenised with the tokenizer's own special tokens, as the length tasks'
  prompts are; its responses without added special tokens.
- EOS: a response ends at its first EOS token (anything a template writes after it, e.g. Zephyr's newline, is dropped);
  a response without one gets EOS appended, so the policy learns to stop exactly where generation stops.

Drops and truncation, each counted in the summary (`info`) and printed:
- ties: equal scores (where the schema has scores) or an AlpacaFarm preference other than 1/2: dropped.
- malformed: a chat row whose lists are empty, do not end with an assistant turn, or whose prompts differ: dropped.
- `max_prompt_length` P: a longer prompt keeps its LAST P tokens (the end, where the question and the assistant tag are).
- `max_length` L: prompt + response <= L; a longer response is cut to L - len(prompt) tokens and so loses its EOS (it
  reads as a truncated generation, never as a finished one); a row whose prompt leaves no room is dropped.
- identical: chosen and rejected equal after truncation (no preference left): dropped.
"""

import json
import math
from collections import Counter

from tasks import load_split, prompt_text

SCORES = [("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"), ("y_w_score", "y_l_score")]
SCHEMAS = "`prompt`/`chosen`/`rejected` (text or chat messages), AlpacaFarm's `instruction`/`input`/`output_1`/`output_2`/`preference`, " \
          "or the study's `prompt`/`y_w`/`y_l`"


def schema_of(ds, spec: str) -> str:
    """Which of the supported row layouts `ds` has; a one-line error naming the missing columns otherwise."""
    cols = set(ds.column_names)
    if len(ds) == 0:
        raise SystemExit(f"dataset {spec!r} has no rows")
    if {"chosen", "rejected"} <= cols:
        if isinstance(ds[0]["chosen"], list):
            return "chat"
        if "prompt" not in cols:
            raise SystemExit(f"dataset {spec!r} lacks columns ['prompt'] (its chosen/rejected are text); it has {sorted(cols)}")
        return "text"
    if {"instruction", "output_1", "output_2", "preference"} <= cols:
        return "alpaca_farm"
    if {"prompt", "y_w", "y_l"} <= cols:
        return "study"
    near = max([["prompt", "chosen", "rejected"], ["instruction", "output_1", "output_2", "preference"], ["prompt", "y_w", "y_l"]],
               key=lambda c: len(cols & set(c)))
    raise SystemExit(f"dataset {spec!r} lacks columns {[c for c in near if c not in cols]}; it has {sorted(cols)} (expected {SCHEMAS})")


def pair_of(row: dict, schema: str):
    """(prompt, chosen, rejected, chosen_score, rejected_score, status) of one row: prompt is text or a list of messages,
    responses are text, scores NaN where the schema has none; status "ok", "tie" or "malformed"."""
    score = next(((float(row[a]), float(row[b])) for a, b in SCORES if row.get(a) is not None and row.get(b) is not None),
                 (math.nan, math.nan))
    if schema == "chat":
        c, r = row["chosen"], row["rejected"]
        if not (len(c) >= 2 and len(r) >= 2 and c[-1]["role"] == r[-1]["role"] == "assistant" and c[:-1] == r[:-1]):
            return None, "", "", *score, "malformed"
        prompt, chosen, rejected = [{"role": m["role"], "content": m["content"]} for m in c[:-1]], c[-1]["content"], r[-1]["content"]
    elif schema == "text":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    elif schema == "alpaca_farm":
        prompt, (chosen, rejected) = prompt_text(row, column=""), (row["output_1"], row["output_2"])
        if row["preference"] == 2:
            chosen, rejected = rejected, chosen
        elif row["preference"] != 1:
            return prompt, chosen, rejected, *score, "tie"
    else:  # the study's relabelled data: y_w / y_l are the prompt followed by the response (else: after the last assistant tag)
        prompt, tag = row["prompt"], "<|assistant|>"
        cut = [len(prompt) if y.startswith(prompt) else y.rindex(tag) + len(tag) if tag in y else None for y in (row["y_w"], row["y_l"])]
        if None in cut:
            return None, "", "", *score, "malformed"
        chosen, rejected = row["y_w"][cut[0]:], row["y_l"][cut[1]:]
    return prompt, chosen, rejected, *score, "tie" if score[0] == score[1] else "ok"


def encode_prompt(prompt, tokenizer, chat: bool):
    """(prompt ids, prompt text as the policy sees it, messages or None) for a text or message-list prompt."""
    if isinstance(prompt, str) and not chat:
        return tokenizer(prompt)["input_ids"], prompt, None
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if tokenizer.chat_template is None:
        raise SystemExit("the dataset's prompts are chat messages but the model's tokenizer has no chat template: use a chat "
                         "model, or a dataset with text prompts")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"], text, messages


def encode_response(response: str, prompt_text_: str, messages, tokenizer):
    """Response ids: the final assistant turn as the chat template renders it after the prompt (messages given), or the
    text itself; cut after its first EOS, or EOS appended."""
    text = response
    if messages is not None:
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt_text_):
            raise SystemExit("the model's chat template does not render a conversation as its prompt followed by the last "
                             "assistant turn, so the response boundary is undefined; use another template")
        text = full[len(prompt_text_):]
    ids, eos = tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def tokenize_pairs(ds, spec: str, tokenizer, chat: bool, max_prompt_length=None, max_length=None):
    """Every row of `ds` tokenised for the policy (`datasets.map`, cached by `datasets` for hub and file data).

    Returns (rows Dataset with prompt, chosen, rejected (text), prompt_ids, chosen_ids, rejected_ids, chosen_score,
    rejected_score, source (the prompt as JSON: text or messages), status, prompt_cut, responses_cut; counts Counter)."""
    schema = schema_of(ds, spec)

    def encode(row):
        prompt, chosen, rejected, sc, sr, status = pair_of(row, schema)
        out = dict(prompt="", chosen=chosen, rejected=rejected, prompt_ids=[], chosen_ids=[], rejected_ids=[], chosen_score=sc,
                   rejected_score=sr, source="null", status=status, prompt_cut=False, responses_cut=0)
        if status == "malformed":
            return out
        p, text, messages = encode_prompt(prompt, tokenizer, chat)
        c, r = (encode_response(y, text, messages, tokenizer) for y in (chosen, rejected))
        if max_prompt_length is not None and len(p) > max_prompt_length:
            p, out["prompt_cut"] = p[-max_prompt_length:], True  # keep the end: the question and the assistant tag
        room = None if max_length is None else max_length - len(p)
        if room is not None and room < 1:
            status = "prompt_too_long"
        elif room is not None:
            out["responses_cut"] = int(len(c) > room) + int(len(r) > room)
            c, r = c[:room], r[:room]  # a cut response loses its EOS: a truncated generation, not a finished one
        if status == "ok" and c == r:
            status = "identical"
        out.update(prompt=text, prompt_ids=p, chosen_ids=c, rejected_ids=r, source=json.dumps(messages or text), status=status)
        return out

    rows = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {spec}")
    counts = Counter(rows["status"])
    counts.update(prompts_truncated=sum(rows["prompt_cut"]), responses_truncated=sum(rows["responses_cut"]))
    return rows, counts


def load_pairs(spec: str, split: str, tokenizer, chat: bool, max_prompt_length=None, max_length=None):
    """The preference pairs of dataset `spec` (split `split` unless the spec names one) for training.

    Returns (pairs: Dataset with the Task.preference_data columns plus `source`, only the usable rows; prompts: every
    usable row's (prompt ids, source) in order, ties included (on-policy methods need prompts, not labels);
    summary dict of counts). Prints one line of what was kept, dropped and truncated."""
    rows, counts = tokenize_pairs(load_split(spec, split), spec, tokenizer, chat, max_prompt_length, max_length)
    prompts = [(p, s) for p, s, st in zip(rows["prompt_ids"], rows["source"], rows["status"]) if st not in ("malformed", "prompt_too_long")]
    pairs = rows.filter(lambda st: st == "ok", input_columns="status").remove_columns(["status", "prompt_cut", "responses_cut"])
    summary = {"dataset_rows": len(rows), "pairs": len(pairs), "dropped_ties": counts["tie"], "dropped_malformed": counts["malformed"],
               "dropped_prompt_too_long": counts["prompt_too_long"], "dropped_identical": counts["identical"],
               "prompts_truncated": counts["prompts_truncated"], "responses_truncated": counts["responses_truncated"]}
    print(f"[cleanpref] dataset {spec} ({split}): {len(rows)} rows -> {len(pairs)} pairs; dropped {counts['tie']} ties, "
          f"{counts['malformed']} malformed, {counts['prompt_too_long']} with no room for a response (--max-length "
          f"{max_length}), {counts['identical']} identical after truncation; truncated {counts['prompts_truncated']} prompts "
          f"(to their last --max-prompt-length {max_prompt_length} tokens) and {counts['responses_truncated']} responses "
          f"(cut to --max-length {max_length} tokens with the prompt, EOS lost)")
    if len(pairs) == 0:
        raise SystemExit(f"dataset {spec!r} ({split}) has no usable preference pairs after dropping ties and malformed rows")
    return pairs, prompts, summary


def unique_prompts(prompts):
    """[(ids, source)] -> (list of distinct prompt ids in first-seen order, {tuple(ids): prompt text or messages})."""
    seen = {}
    for ids, source in prompts:
        seen.setdefault(tuple(ids), json.loads(source))
    return [list(k) for k in seen], seen
