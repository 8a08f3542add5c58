"""External reward models: any Hugging Face sequence classifier with one output as a task's proxy or gold reward.

    reward = ExternalReward(path_or_id, policy_tokenizer, device, sources)
    reward(queries, responses)          # [B] fp32, queries left-padded, responses right-padded, in the policy's token ids

Two ways to feed it, chosen once when it loads (`mode`):
- "pass-through": the reward model has the policy's tokenizer (the same tokens at the same ids, pads aside, the same
  EOS and the same chat template), e.g. one trained by algos/reward_model.py from the SFT policy. The policy's ids go
  straight in, no decoding: `algos/reward_model.py`'s `reward_scores` (rows cut to their real tokens, grouped by
  length), the score read at the last real token, the response's EOS; the policy's pads become the model's pad id.
- "chat template" / "text pair": any other tokenizer. Each row is decoded and re-tokenised, in batches of RM_BATCH rows,
  by the reward model's own tokenizer, as its users call it:
  - the prompt is the one the task registered for those ids (`sources`: a dataset's text or chat messages), else the
    policy tokenizer's decoding of the ids (special tokens skipped);
  - the response is decoded up to its EOS (special tokens skipped);
  - a reward model with a chat template gets the conversation (prompt messages, or the text prompt as one user turn,
    then the response as the assistant turn) rendered by its template, tokenised without added special tokens;
  - one without a template gets the text pair `tokenizer(prompt, response)` (its own special tokens, e.g. DeBERTa's
    [CLS] x [SEP] y [SEP], as OpenAssistant's reward models are used); a finished response gets the model's EOS token
    appended where it has one, so that a decoder reads its score at EOS, as the pass-through path does. A chat prompt
    is then its messages' contents joined by blank lines. Inputs longer than the tokenizer's model_max_length are cut.
  The model reads its score where it was trained to (the last non-pad token for decoders, [CLS] for encoders).
Weights: bf16 on CUDA (inference only), fp32 on CPU. A reward model without a pad token gets one (embeddings grown);
batches are right-padded.
"""

import torch

from tasks import LOAD_ERRORS, _hub_error, _resolve

RM_BATCH = 32  # rows per forward in the re-tokenised path


def check_reward_model(path_or_id: str, what: str):
    """The classifier's config, or a one-line error (before any weights load) unless it has exactly one output."""
    from transformers import AutoConfig

    src = _resolve(path_or_id, what)
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as err:
        raise _hub_error(path_or_id, what, err) from None
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise SystemExit(f"{what} {path_or_id!r} is not a sequence classifier (architectures {config.architectures}): pass an "
                         f"AutoModelForSequenceClassification checkpoint with one output, e.g. one trained by algos/reward_model.py")
    if config.num_labels != 1:
        raise SystemExit(f"{what} {path_or_id!r} has {config.num_labels} outputs (num_labels): a reward model must have exactly one")
    return src


def same_tokenizer(policy_tokenizer, rm_tokenizer) -> bool:
    """The same tokens at the same ids (each side's pad token aside), the same EOS, a pad distinct from EOS, the same
    chat template: then the policy's ids mean to the reward model what they mean to the policy."""
    def vocab(t):
        return {k: v for k, v in t.get_vocab().items() if k != t.pad_token}

    return (rm_tokenizer.pad_token_id != rm_tokenizer.eos_token_id and policy_tokenizer.eos_token_id == rm_tokenizer.eos_token_id
            and policy_tokenizer.chat_template == rm_tokenizer.chat_template and vocab(policy_tokenizer) == vocab(rm_tokenizer))


class ExternalReward:
    """r(x, y) from a sequence classifier with one output; see the module docstring. `pass_through=None` decides by
    `same_tokenizer`; False forces the re-tokenised path (benchmarks, tests). `rows_on_disk`: the checkpoint's embedding
    rows before any pad row was added (a critic initialised from it must cover the policy's pad id)."""

    def __init__(self, path_or_id: str, policy_tokenizer, device, sources: dict, what: str = "reward model", pass_through=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from common import disable_dropout

        src = check_reward_model(path_or_id, what)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
            self.model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype)
        except LOAD_ERRORS as err:
            raise _hub_error(path_or_id, what, err) from None
        self.rows_on_disk = self.model.get_input_embeddings().num_embeddings
        if self.tokenizer.pad_token is None:  # batching needs one; the classifier reads its score before the pads
            self.tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        self.tokenizer.padding_side = "right"  # pads after the real tokens: a decoder's positions need no position ids
        if len(self.tokenizer) > self.rows_on_disk:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = disable_dropout(self.model).to(device).eval().requires_grad_(False)
        self.path, self.policy_tokenizer, self.sources, self.device = path_or_id, policy_tokenizer, sources, torch.device(device)
        self.pass_through = same_tokenizer(policy_tokenizer, self.tokenizer) if pass_through is None else pass_through
        self.mode = "pass-through" if self.pass_through else "chat template" if self.tokenizer.chat_template else "text pair"

    def texts(self, queries, responses):
        """The rows as the reward model's users would write them: (prompts: text or messages, responses: text, ended: bool)."""
        pad, eos = self.policy_tokenizer.pad_token_id, self.policy_tokenizer.eos_token_id
        prompts, replies, ended = [], [], []
        for q, r in zip(queries.tolist(), responses.tolist()):
            q = [t for t in q if t != pad]
            source = self.sources.get(tuple(q))
            prompts.append(source if source is not None else self.policy_tokenizer.decode(q, skip_special_tokens=True))
            stop = r.index(eos) if eos in r else len(r)
            replies.append(self.policy_tokenizer.decode([t for t in r[:stop] if t != pad], skip_special_tokens=True))
            ended.append(stop < len(r))
        return prompts, replies, ended

    def encode(self, prompts, replies, ended):
        """The reward model's own tokenisation of (prompt, response) rows -> BatchEncoding (padded, on CPU)."""
        tok = self.tokenizer
        limit = dict(truncation=True, max_length=tok.model_max_length) if tok.model_max_length < 1e6 else {}
        if tok.chat_template:
            chats = [(p if isinstance(p, list) else [{"role": "user", "content": p}]) + [{"role": "assistant", "content": y}]
                     for p, y in zip(prompts, replies)]
            return tok(tok.apply_chat_template(chats, tokenize=False), add_special_tokens=False, padding=True, return_tensors="pt", **limit)
        prompts = [p if isinstance(p, str) else "\n\n".join(m["content"] for m in p) for p in prompts]
        replies = [y + (tok.eos_token if e and tok.eos_token else "") for y, e in zip(replies, ended)]
        return tok(prompts, replies, padding=True, return_tensors="pt", **limit)

    @torch.no_grad()
    def __call__(self, queries, responses):
        if self.pass_through:
            from algos.reward_model import reward_scores

            pad, rm_pad = self.policy_tokenizer.pad_token_id, self.tokenizer.pad_token_id
            queries, responses = (x.masked_fill(x == pad, rm_pad) for x in (queries, responses))
            return reward_scores(self.model, queries, responses, rm_pad).float()
        prompts, replies, ended = self.texts(queries, responses)
        scores = []
        for s in range(0, len(prompts), RM_BATCH):
            batch = self.encode(prompts[s : s + RM_BATCH], replies[s : s + RM_BATCH], ended[s : s + RM_BATCH]).to(self.device)
            scores.append(self.model(**batch).logits[:, 0].float())
        return torch.cat(scores).to(queries.device)

    def describe(self) -> str:
        return f"{self.path} ({self.mode})"
