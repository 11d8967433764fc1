"""Eval tasks against hand-computed numbers: generation and scoring are stubbed where the task's own
arithmetic is under test, and checked against plain forward passes / `generate` where they are not."""
from __future__ import annotations

import math
import sys

import pytest

from alignment.rollout import Completion, encode_prompts
from evals import TASKS, EvalContext, EvalResult, check_task_args
from evals.base import encode_pair
from evals.tasks import LM_EVAL_MISSING, pass_at_k

CHAT = [{"role": "user", "content": "1+2="}]


def gen(text: str, tokenizer=None, finish: str = "stop") -> Completion:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] if tokenizer else []
    return Completion(prompt_ids=[], completion_ids=ids, text=text, logprobs=[], finish_reason=finish)


def stub_generate(ctx, table: dict):
    """ctx.generate -> the completions in `table[(model_path, n)][prompt_index]`."""
    calls = []

    def generate(prompts, max_new_tokens, n=1, temperature=0.0, *, model_path=None):
        calls.append((model_path, n, temperature))
        groups = table[(model_path or ctx.model_path, n)]
        assert len(groups) == len(prompts)
        return [[g if isinstance(g, Completion) else gen(g) for g in group] for group in groups]

    ctx.generate = generate
    return calls


# ---------------------------------------------------------------- registry and arguments


def test_registered_tasks():
    assert {"accuracy", "reward_score", "win_rate", "preference_accuracy", "perplexity", "kl", "length",
            "lm_eval"} <= set(TASKS.names())


def test_check_task_args_names_the_problem():
    assert check_task_args("accuracy", {"k": 4, "backend": "hf"}, has_data=True) == []
    [p] = check_task_args("acuracy", {}, has_data=True)
    assert "unknown eval task 'acuracy'" in p and "did you mean 'accuracy'" in p
    [p] = check_task_args("accuracy", {"max_new_token": 8}, has_data=True)
    assert "no argument 'max_new_token'" in p and "did you mean 'max_new_tokens'" in p
    [p] = check_task_args("win_rate", {}, has_data=True)
    assert "needs argument 'reward_stage'" in p
    [p] = check_task_args("accuracy", {"backend": "tpu"}, has_data=True)
    assert "backend must be one of auto, hf, vllm" in p
    [p] = check_task_args("perplexity", {}, has_data=False)
    assert "needs a dataset" in p
    assert check_task_args("lm_eval", {"tasks": ["gsm8k"]}, has_data=False) == []


# ---------------------------------------------------------------- accuracy and pass@k


def test_pass_at_k_closed_form():
    # 1 - C(n-c, k) / C(n, k): n=5, c=2, k=2 -> 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw has a hit
    for n, c, k in [(8, 3, 4), (20, 7, 5), (6, 1, 6)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": CHAT, "answer": "3"},
        {"prompt": "2+2=", "answer": "4"}, {"prompt": "half of 1?", "answer": "1/2"}]


def test_accuracy_greedy_and_pass_at_k_on_known_completions():
    ctx = EvalContext(model_path="policy", rows=ROWS)
    samples = [["2", "2", "2", "2"], ["3", "x", "3", "y"], ["5", "5", "5", "5"], ["0.5", "no", "no", "no"]]
    calls = stub_generate(ctx, {
        ("policy", 1): [["2"], ["the sum is 3"], ["5"], ["1"]],  # right, right (math-verify), wrong, wrong
        ("policy", 4): samples,
    })
    result = TASKS.get("accuracy")(ctx, k=[1, 2], num_samples=4)
    assert calls == [(None, 1, 0.0), (None, 4, 1.0)]  # greedy, then sampled at temperature 1
    assert result.metrics["accuracy"] == 0.5
    hits = [4, 2, 0, 1]  # correct samples per prompt (0.5 = 1/2 by math-verify)
    assert result.metrics["pass@1"] == pytest.approx(sum(hits) / 16)
    expected = sum(1 - math.comb(4 - c, 2) / math.comb(4, 2) for c in hits) / 4  # (1 + 5/6 + 0 + 1/2) / 4
    assert result.metrics["pass@2"] == pytest.approx(expected)
    assert [s["correct"] for s in result.samples] == [True, True, False, False]
    assert result.samples[1] == {"prompt": "1+2=", "completion": "the sum is 3", "answer": "3", "correct": True}
    assert result.main == "accuracy" and result.higher_is_better["pass@2"] is True


def test_accuracy_exact_match_and_answer_tags():
    ctx = EvalContext(model_path="policy", rows=ROWS)
    stub_generate(ctx, {("policy", 1): [["2"], ["<think>hm</think><answer> 3 </answer>"], ["4.0"], ["1/2"]]})
    result = TASKS.get("accuracy")(ctx, match="exact")
    assert [s["correct"] for s in result.samples] == [True, True, False, True]  # "4.0" != "4" exactly
    assert result.metrics == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="match must be one of math, exact"):
        TASKS.get("accuracy")(ctx, match="fuzzy")


# ---------------------------------------------------------------- generation on the tiny model


def test_generate_batched_left_padded_equals_one_by_one(tiny_model_path):
    import torch

    ctx = EvalContext(model_path=str(tiny_model_path), backend="hf", batch_size=3)
    prompts = ["1+1=", CHAT, "a much longer prompt: 12+30="]
    got = ctx.generate(prompts, max_new_tokens=5)
    model, tok = ctx.model(), ctx.tokenizer
    for prompt, [g] in zip(prompts, got):
        ids = torch.tensor(encode_prompts(tok, [prompt]))
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        stop = want.index(tok.eos_token_id) + 1 if tok.eos_token_id in want else len(want)
        assert g.completion_ids == want[:stop]
        assert g.text == tok.decode(want[:stop], skip_special_tokens=True)
        assert g.finish_reason == ("stop" if tok.eos_token_id in want else "length")
    assert ctx.generate(prompts, max_new_tokens=5) is got  # remembered for the session
    ctx.session.release()


# ---------------------------------------------------------------- perplexity


def test_encode_pair_matches_trl_layout(tiny_model_path):
    from alignment.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_path))
    c = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731 -- char-level tokenizer
    eos = tok.eos_token_id
    assert encode_pair(tok, "1+2=", "3") == (c("1+2="), c("3") + [eos])
    prompt_ids, completion_ids = encode_pair(tok, CHAT, [{"role": "assistant", "content": "3"}])
    assert tok.decode(prompt_ids) == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert completion_ids == c("3") + [eos]  # the template's newline after EOS is not scored


def test_perplexity_is_exp_of_mean_completion_nll(tiny_model_path):
    import torch

    rows = [{"prompt": "1+2=", "completion": "3"},
            {"messages": CHAT + [{"role": "assistant", "content": "12"}]}]
    ctx = EvalContext(model_path=str(tiny_model_path), rows=rows, batch_size=2)
    result = TASKS.get("perplexity")(ctx)
    model, tok = ctx.model(), ctx.tokenizer
    nll, count = 0.0, 0
    for prompt, completion in [("1+2=", "3"), (CHAT, [{"role": "assistant", "content": "12"}])]:
        p, c = encode_pair(tok, prompt, completion)
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        for i, token in enumerate(c):  # completion token i sits at len(p) + i, predicted one step earlier
            nll -= logprobs[len(p) + i - 1, token].item()
            count += 1
    assert count == 2 + 3  # "3" + EOS, "12" + EOS
    assert result.metrics["tokens"] == count
    assert result.metrics["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.higher_is_better == {"perplexity": False, "nll": False}
    ctx.session.release()


# ---------------------------------------------------------------- preference accuracy


PAIRS = [{"prompt": "q1", "chosen": "good", "rejected": "bad"},
         {"prompt": "q2", "chosen": "fine", "rejected": "awful"},
         {"prompt": "q3", "chosen": "meh", "rejected": "great"},
         {"chosen": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "no"}]}]
SCORES = {"good": 2.0, "bad": 1.0, "fine": 0.5, "awful": -1.0, "meh": 0.0, "great": 3.0, "yes": 1.0, "no": 0.0}


def test_preference_accuracy_with_a_reward_stage():
    ctx = EvalContext(model_path="policy", rows=PAIRS)
    seen = []

    def reward_scores(stage, prompts, completions):
        seen.append((stage, prompts[3]))
        return [SCORES[c] for c in completions]

    ctx.reward_scores = reward_scores
    result = TASKS.get("preference_accuracy")(ctx, reward_stage="rm")
    assert result.metrics["accuracy"] == 0.75  # pair 3 prefers the rejected answer
    assert result.metrics["margin"] == pytest.approx((1 + 1.5 - 3 + 1) / 4)
    assert seen[0] == ("rm", [{"role": "user", "content": "q4"}])  # implicit prompt: the shared turns
    assert [s["correct"] for s in result.samples] == [True, True, False, True]


def test_preference_accuracy_by_the_implicit_dpo_reward():
    ctx = EvalContext(model_path="policy", rows=PAIRS[:2], reference_path="ref")
    ctx.session.tokenizers["policy"] = _FakeTokenizer()
    # summed log-probs per sequence: chosen 1, chosen 2, rejected 1, rejected 2
    logp = {"policy": [[-1.0, -1.0], [-3.0], [-4.0], [-1.0, -0.5]], "ref": [[-2.0, -1.0], [-2.0], [-3.0], [-2.0]]}
    ctx.token_logprobs = lambda pairs, model_path=None: logp[model_path or "policy"]
    result = TASKS.get("preference_accuracy")(ctx, beta=0.5)
    # rewards 0.5 * (policy - ref): chosen 0.5, -0.5; rejected -0.5, 0.25 -> margins 1.0, -0.75
    assert result.metrics["accuracy"] == 0.5
    assert result.metrics["margin"] == pytest.approx((1.0 - 0.75) / 2)
    base = EvalContext(model_path="policy", rows=PAIRS, stage="base")
    assert "no reference model" in TASKS.get("preference_accuracy")(base).skipped


class _FakeTokenizer:
    eos_token, eos_token_id = "</s>", 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


# ---------------------------------------------------------------- reward score and win rate


def test_reward_score_and_win_rate_with_stub_models():
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    ctx = EvalContext(model_path="policy", rows=rows, base_path="base-model")
    stub_generate(ctx, {("policy", 1): [["x1"], ["x2"], ["x3"]], ("base-model", 1): [["y1"], ["y2"], ["y3"]]})
    scores = {"x1": 1.0, "x2": 2.0, "x3": 3.0, "y1": 1.0, "y2": 3.0, "y3": 0.0}
    ctx.reward_scores = lambda stage, prompts, completions: [scores[c] for c in completions]
    result = TASKS.get("reward_score")(ctx, reward_stage="rm")
    assert result.metrics["reward"] == 2.0
    assert result.metrics["reward_std"] == pytest.approx(math.sqrt(2 / 3))
    result = TASKS.get("win_rate")(ctx, reward_stage="rm")
    assert result.metrics == {"win_rate": pytest.approx((0.5 + 0 + 1) / 3), "reward": 2.0,
                              "baseline_reward": pytest.approx(4 / 3)}  # a tie counts half
    assert [s["correct"] for s in result.samples] == [None, False, True]


def test_reward_scores_batched_equal_one_by_one(tiny_model_path, tmp_path):
    """A reward model scores the last real token: right padding in a batch changes nothing."""
    import json

    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from alignment.models import ARTIFACT_FILE, load_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model_path, num_labels=1)
    rm = LlamaForSequenceClassification(config)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny_model_path)).save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / ARTIFACT_FILE).write_text(json.dumps({"kind": "full", "base": None, "head": "sequence_classification"}))
    ctx = EvalContext(model_path=str(tiny_model_path), batch_size=4)
    prompts, completions = ["1+1=", CHAT, "3+3="], ["2", "3", "a long answer: 6"]
    batched = ctx.reward_scores(str(tmp_path / "rm"), prompts, completions)
    ctx.batch_size = 1
    single = ctx.reward_scores(str(tmp_path / "rm"), prompts, completions)
    assert batched == pytest.approx(single, abs=1e-5) and len(set(batched)) == 3
    with pytest.raises(ValueError, match="not a reward model"):
        ctx.reward_scores(str(tiny_model_path), prompts, completions)
    ctx.session.release()


# ---------------------------------------------------------------- KL and length


def test_kl_estimates_by_hand():
    ctx = EvalContext(model_path="policy", rows=[{"prompt": "a"}, {"prompt": "b"}], reference_path="ref")
    # Completion(prompt_ids, completion_ids, text, logprobs, finish_reason)
    stub_generate(ctx, {("policy", 1): [[Completion([3], [5, 6], "xy", [], "stop")], [Completion([4], [7], "z", [], "length")]]})
    logp = {"policy": [[-1.0, -2.0], [-0.5]], "ref": [[-1.5, -1.0], [-0.5]]}
    scored = []

    def token_logprobs(pairs, model_path=None):
        scored.append(pairs)
        return logp[model_path or "policy"]

    ctx.token_logprobs = token_logprobs
    result = TASKS.get("kl")(ctx)
    assert scored == [[([3], [5, 6]), ([4], [7])]] * 2  # the engine's own token ids, under both models
    # d = log pi - log pi_ref = [0.5, -1.0], [0.0]
    assert result.metrics["kl"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)  # k1, token mean
    k3 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0) + 0.0
    assert result.metrics["kl_k3"] == pytest.approx(k3 / 3)
    assert result.metrics["kl_seq"] == pytest.approx((-0.5 + 0.0) / 2)
    assert "own reference" in TASKS.get("kl")(EvalContext(model_path="policy", rows=[{"prompt": "a"}])).skipped


def test_kl_of_a_model_against_itself_is_zero(tiny_model_path):
    path = str(tiny_model_path)
    ctx = EvalContext(model_path=path, rows=[{"prompt": "1+1="}, {"prompt": CHAT}], reference_path=path, backend="hf")
    result = TASKS.get("kl")(ctx, max_new_tokens=4, num_samples=2)
    assert result.metrics == {"kl": 0.0, "kl_k3": 0.0, "kl_seq": 0.0}
    ctx.session.release()


def test_length_stats_on_known_strings(tiny_model_path):
    from alignment.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_path))
    ctx = EvalContext(model_path="policy", rows=[{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}, {"prompt": "d"}])
    texts = ["4", "12", "hello", "abcdefghi"]  # char tokens + EOS: 2, 3, 6, 10
    stub_generate(ctx, {("policy", 1): [[gen(t, tok, "length" if t == "abcdefghi" else "stop")] for t in texts]})
    result = TASKS.get("length")(ctx)
    assert result.metrics == {"mean": 5.25, "median": 4.5, "max": 10.0, "truncated_frac": 0.25}
    assert [s["tokens"] for s in result.samples] == [2, 3, 6, 10]


# ---------------------------------------------------------------- lm-eval bridge


def test_lm_eval_is_skipped_with_a_message_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    result = TASKS.get("lm_eval")(EvalContext(model_path="policy"), tasks=["gsm8k"])
    assert isinstance(result, EvalResult) and result.metrics == {}
    assert result.to_json()["skipped"] == LM_EVAL_MISSING == "lm-eval is not installed: pip install alignkit[eval]"


def test_lm_eval_flattens_the_harness_results(monkeypatch):
    import types

    seen = {}

    def simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                      "exact_match_stderr,strict-match": 0.1}},
                "higher_is_better": {"gsm8k": {"exact_match": True}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    result = TASKS.get("lm_eval")(EvalContext(model_path="/m", dtype="bfloat16"), tasks=["gsm8k"], limit=4)
    assert result.metrics == {"gsm8k/exact_match": 0.25}
    assert result.higher_is_better == {"gsm8k/exact_match": True}
    assert seen["model_args"] == {"pretrained": "/m", "dtype": "bfloat16"} and seen["limit"] == 4


# ---------------------------------------------------------------- the eval table


def test_eval_table_computes_every_cell_once():
    from evals.table import Cell, build_eval_table

    results = {
        "dpo": {"tasks": {"acc": {"metrics": {"accuracy": 0.75, "length": 8.0}, "main": "accuracy",
                                  "higher_is_better": {"accuracy": True}},
                          "pref": {"metrics": {"accuracy": 0.6, "margin": 0.1}, "main": "accuracy"}}},
        "base": {"tasks": {"acc": {"metrics": {"accuracy": 0.5, "length": 10.0}, "main": "accuracy",
                                   "higher_is_better": {"accuracy": True}},
                           "pref": {"metrics": {}, "skipped": "no reference"}}},
    }
    table = build_eval_table(results, ["base", "dpo"])
    assert table.stages == ["base", "dpo"] and table.tasks == ["acc", "pref"]
    got = [(r.task, r.metric, r.main, r.first, r.last, r.cells) for r in table.rows]
    assert got == [
        ("acc", "accuracy", True, True, False, [Cell(0.5), Cell(0.75, 0.25, "good")]),
        ("acc", "length", False, False, True, [Cell(10.0), Cell(8.0, -2.0, "neutral")]),  # no direction
        ("pref", "accuracy", True, True, False, [Cell(None, skipped="no reference"), Cell(0.6)]),
        ("pref", "margin", False, False, True, [Cell(None), Cell(0.1)]),
    ]
    dpo_acc, dpo_len = table.rows[0].cells[1], table.rows[1].cells[1]
    assert (dpo_acc.text, dpo_acc.delta_text, dpo_len.delta_text) == ("0.75", "+0.25", "−2")
    assert [c.text for c in table.rows[2].cells + table.rows[3].cells] == ["skipped", "0.6", "–", "0.1"]
    assert table.skipped == [("pref", "no reference", ["base"])]
