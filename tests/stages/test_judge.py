"""The `judge` reward and the judge eval tasks: verdict parsing, the checks a recipe gets before any model
loads, a judge served by a tiny OpenAI-compatible server on 127.0.0.1 (no network), and a judge model folder
through the hf engine."""
from __future__ import annotations

import doctest
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rewards.judge
from alignment.recipe import RecipeError
from alignment.testing import make_tokenizer
from evals import EvalContext, TASKS
from evals.tasks import judge_score, judge_win_rate
from rewards import build_reward, missing_metrics
from rewards.judge import Judge, check_judge_params
from tests.helpers import write_recipe


def test_docstring_examples():
    assert doctest.testmod(rewards.judge).failed == 0


def test_registered():
    assert "judge" in rewards.REWARDS and {"judge_score", "judge_win_rate"} <= set(TASKS.names())


@pytest.mark.parametrize("params, error", [
    ({"model": "http://10.0.0.5:8000/v1", "tokenizer": "t"}, "must be http://127.0.0.1"),
    ({"model": "ftp://127.0.0.1/x", "tokenizer": "t"}, "must be http://127.0.0.1"),
    ({"model": "http://127.0.0.1:8000"}, "needs `tokenizer:`"),
    ({"model": "m", "verdict": "stars"}, "verdict must be one of score, yes_no"),
    ({"model": "m", "min_score": 5, "max_score": 1}, "min_score < max_score"),
    ({"model": "m", "template": "{{ prompt "}, "template line 1"),
])
def test_bad_params_refused_before_loading(params, error):
    with pytest.raises(ValueError, match=error):
        check_judge_params(params)
    with pytest.raises(ValueError, match=error):  # the check runs wherever the reward is built
        build_reward({"name": "judge", **params})


def test_recipe_names_file_line_and_key(tmp_path, tiny_model_path):
    from alignment.validate import load_recipe

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    stages = {"grpo": {"method": "grpo", "data": ["prompts"], "args": {"max_steps": 1},
                       "rewards": [{"name": "judge", "model": "http://192.168.1.2:80", "tokenizer": "x"},
                                   {"name": "format", "weight": 0.1}]},
              "g2": {"method": "grpo", "data": ["prompts"], "args": {"max_steps": 1},
                     "rewards": [{"name": "judge", "model": "sfft"}]}}
    path = write_recipe(tmp_path, tiny_model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    lines = path.read_text().splitlines()
    url_line = next(i for i, line in enumerate(lines, 1) if "name: judge" in line)
    assert f"{path}:{url_line}: stages.grpo.rewards.0.name: reward 'judge': server URL" in text
    assert "stages.g2.rewards.0.model: judge model 'sfft' is neither a stage" in text


def test_stage_judge_is_a_dependency(tmp_path, tiny_model_path):
    from alignment.validate import load_recipe

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    stages = {"grpo": {"method": "grpo", "data": ["prompts"], "args": {"max_steps": 1},
                       "rewards": [{"name": "judge", "model": "sft", "verdict": "yes_no"}]},
              "sft": {"method": "sft", "data": ["prompts_sft"], "args": {"max_steps": 1}}}
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    data = {"prompts": {"path": "prompts.jsonl"}, "prompts_sft": {"path": "sft.jsonl"}}
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_path, stages, data=data))
    assert recipe.order() == ["sft", "grpo"] and recipe.ancestors("grpo") == ["sft", "grpo"]


# ---------------------------------------------------------------- a judge server on 127.0.0.1


class _Server(BaseHTTPRequestHandler):
    """OpenAI-compatible completions (token-id prompts, as `alignment.rollout.VLLMServerEngine` sends them):
    the reply is chosen from what the decoded prompt contains -- a stand-in judge with known verdicts."""

    tokenizer = make_tokenizer()

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /health, /v1/models
        self._reply({"data": [{"id": "judge"}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        choices = []
        for i, ids in enumerate(body["prompt"]):
            text = self.tokenizer.decode(ids)
            if "Response A:\ngood" in text:
                verdict = "A"
            elif "Response B:\ngood" in text:
                verdict = "B"
            elif "Response:\ngood" in text:
                verdict = "Yes" if "yes or no" in text else "Score: 9"
            elif "Response:\nbad" in text:
                verdict = "no" if "yes or no" in text else "2 out of 10"
            else:
                verdict = "I cannot say"
            ids_out = self.tokenizer(verdict)["input_ids"]
            choices.append({"index": i, "text": verdict, "token_ids": ids_out, "finish_reason": "stop",
                            "logprobs": {"token_logprobs": [0.0] * len(ids_out)}})
        self._reply({"choices": choices})

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_server_judge_scores_and_counts_unparsable(judge_url, tiny_model_path):
    fn = build_reward({"name": "judge", "model": judge_url, "tokenizer": str(tiny_model_path)})
    prompts = [[{"role": "user", "content": "2+2="}]] * 3
    assert fn(prompts, ["good", "bad", "???"]) == [9.0, 2.0, None]
    assert missing_metrics([fn]) == {"reward/judge/missing": 1}
    yes_no = build_reward({"name": "judge", "model": judge_url, "tokenizer": str(tiny_model_path),
                           "verdict": "yes_no",
                           "template": "Is the response right for {{ answer }}?\nResponse:\n{{ completion }}\nyes or no"})
    assert yes_no(["q"] * 3, ["good", "bad", "???"], answer=["4", "4", "4"]) == [1.0, 0.0, None]


def test_server_judge_pairwise_in_both_orders(judge_url, tiny_model_path):
    judge = Judge(judge_url, tokenizer=str(tiny_model_path))
    # the server prefers "good" in either position; two unparsed replies leave a pair out
    assert judge.compare(["q", "q", "q"], ["good", "bad", "meh"], ["bad", "good", "meh"]) == [1.0, 0.0, None]


def test_eval_tasks_through_server(judge_url, tiny_model_path):
    rows = [{"prompt": "1+1="}, {"prompt": "2+2="}]
    ctx = EvalContext(model_path=str(tiny_model_path), rows=rows, backend="hf", batch_size=2)
    # the tiny random model writes neither "good" nor "bad": no verdict parses, every row counts as unparsed
    score = judge_score(ctx, judge=judge_url, tokenizer=str(tiny_model_path), max_new_tokens=4)
    assert score.metrics["unparsed"] == 1.0 and score.main == "judge_score"
    wins = judge_win_rate(ctx, judge=judge_url, tokenizer=str(tiny_model_path), baseline=str(tiny_model_path),
                          max_new_tokens=4)
    assert wins.metrics["unparsed"] == 1.0 and len(wins.samples) == 2


def test_model_folder_judge_through_hf(tiny_model_path):
    """A local judge model: greedy replies from the tiny random model, batched; each a score in range or None."""
    fn = build_reward({"name": "judge", "model": str(tiny_model_path), "batch_size": 2, "max_new_tokens": 4})
    scores = fn(["1+1="] * 3, ["2", "3", "11"])
    assert len(scores) == 3 and all(s is None or 1 <= s <= 10 for s in scores)
    assert missing_metrics([fn])["reward/judge/missing"] == sum(s is None for s in scores)
