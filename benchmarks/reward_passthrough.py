"""What passing the policy's ids straight to a same-tokenizer reward model saves over decode + re-tokenise (issue 14).

    python benchmarks/reward_passthrough.py [--rows 256] [--repeats 7]

One reward model (tests/test_realdata.py's `same_rm`: a tiny Llama classifier with the fixture chat tokenizer) scores the
same batch both ways (tasks/reward_models.py): "pass-through" (ids in, pads swapped) and "re-tokenised" (decode each row,
render the chat with the template, tokenise in batches of RM_BATCH). Prints the median wall time of each, and of the
decode + re-tokenise step alone (which does not depend on the reward model's size), per 1000 rows. One torch thread.
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def median_s(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from test_realdata import WORDS, build_fixtures
    from transformers import AutoTokenizer

    from common import pad_rows
    from tasks.reward_models import ExternalReward

    root = Path(tempfile.mkdtemp(prefix="reward_passthrough-"))
    build_fixtures(root)
    tok = AutoTokenizer.from_pretrained(root / "chat_lm")
    rng = random.Random(0)
    chats = [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40)))}] for _ in range(args.rows)]
    prompts = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
               for m in chats]
    responses = [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 100))), add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id] for _ in range(args.rows)]
    sources = {tuple(p): m for p, m in zip(prompts, chats)}
    q, r = pad_rows(prompts, tok.pad_token_id, left=True), pad_rows(responses, tok.pad_token_id, left=False)
    straight = ExternalReward(str(root / "same_rm"), tok, "cpu", sources)
    retok = ExternalReward(str(root / "same_rm"), tok, "cpu", sources, pass_through=False)
    assert (straight.mode, retok.mode) == ("pass-through", "chat template")
    torch.testing.assert_close(straight(q, r), retok(q, r), atol=1e-4, rtol=1e-4)  # the same scores either way

    def text_step():
        retok.encode(*retok.texts(q, r))

    t_straight, t_retok, t_text = (median_s(f, args.repeats) for f in (lambda: straight(q, r), lambda: retok(q, r), text_step))
    per = 1000 / args.rows
    print(f"{args.rows} rows, prompts {q.shape[1]} / responses {r.shape[1]} tokens at most, median of {args.repeats}; ms per 1000 rows:")
    print(f"  pass-through           {t_straight * per * 1e3:8.1f}")
    print(f"  decode + re-tokenise   {t_retok * per * 1e3:8.1f}   (x{t_retok / t_straight:.2f})")
    print(f"  of which decode + tokenise alone {t_text * per * 1e3:8.1f}")


if __name__ == "__main__":
    main()
