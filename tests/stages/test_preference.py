"""Preference stages on the tiny model, chained from SFT: DPO widens the chosen-rejected margin,
KTO raises desirable and lowers undesirable log-probs, the reward model ranks pairs above chance.
Each with LoRA and with QLoRA (nf4 on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from alignment.models import load_pretrained, load_tokenizer
from tests.helpers import manifest, pair_rows, run_cli, write_jsonl, write_recipe

ADAPTERS = {
    "lora": {"adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}},
    "qlora": {"adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "quantization": {"bits": 4}},
}



def completion_logprob(model, tok, prompt, completion) -> float:
    """Sum of log-probs of the completion's tokens (and its end token) after the chat prompt."""
    ptext = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    p = tok(ptext, add_special_tokens=False)["input_ids"]
    c = tok(completion[0]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))


def rm_score(model, tok, prompt, completion) -> float:
    text = tok.apply_chat_template(prompt + completion, tokenize=False)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()


@pytest.fixture(scope="module", params=list(ADAPTERS))
def chained_run(request, tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp(request.param)
    rows = pair_rows()
    write_jsonl(tmp / "pairs.jsonl", rows)
    from tests.helpers import sum_rows

    write_jsonl(tmp / "sft.jsonl", sum_rows(32))
    data = {"sft": {"path": "sft.jsonl"}, "pairs": {"path": "pairs.jsonl"},
            "kto_rows": {"path": "pairs.jsonl", "unpaired": True}}
    common = {"per_device_train_batch_size": 8, "save_steps": 100, "max_steps": 16}
    stages = {
        "sft": {"method": "sft", "data": ["sft"], "args": {**common, "max_steps": 4, "learning_rate": 1e-2}},
        "dpo": {"method": "dpo", "from": "sft", "data": ["pairs"], "args": {**common, "learning_rate": 1e-2, "beta": 0.1}},
        "kto": {"method": "kto", "from": "sft", "data": ["kto_rows"], "args": {**common, "learning_rate": 1e-2, "beta": 0.1}},
        "rm": {"method": "reward", "from": "sft", "data": ["pairs"], "args": {**common, "learning_rate": 1e-2}},
    }
    recipe = write_recipe(tmp, tiny_model_path, stages, data=data, model=ADAPTERS[request.param])
    res = run_cli(recipe, "--run-dir", tmp / "runs")
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "t", rows



def test_stages_start_from_the_sft_artifact(chained_run):
    run_dir, _ = chained_run
    sft = manifest(run_dir, "sft")
    for stage in ("dpo", "kto", "rm"):
        m = manifest(run_dir, stage)
        assert m["status"] == "done"
        assert m["inputs"]["from_fingerprint"] == sft["fingerprint"]
        meta = json.loads((run_dir / stage / "model" / "alignkit_model.json").read_text())
        assert meta["base"] == "../../sft/merged"


def test_dpo_widens_the_margin(chained_run):
    run_dir, rows = chained_run
    tok = load_tokenizer(str(run_dir / "sft" / "merged"))
    before, after = load_pretrained(run_dir / "sft" / "model"), load_pretrained(run_dir / "dpo" / "model")

    def margin(model):
        return sum(completion_logprob(model, tok, r["prompt"], r["chosen"]) - completion_logprob(model, tok, r["prompt"], r["rejected"])
                   for r in rows) / len(rows)

    assert margin(after) > margin(before) + 1.0


def test_kto_raises_desirable_and_lowers_undesirable(chained_run):
    run_dir, rows = chained_run
    tok = load_tokenizer(str(run_dir / "sft" / "merged"))
    before, after = load_pretrained(run_dir / "sft" / "model"), load_pretrained(run_dir / "kto" / "model")

    def mean_logp(model, key):
        return sum(completion_logprob(model, tok, r["prompt"], r[key]) for r in rows) / len(rows)

    assert mean_logp(after, "chosen") > mean_logp(before, "chosen")
    assert mean_logp(after, "rejected") < mean_logp(before, "rejected")


def test_reward_model_ranks_its_training_pairs(chained_run):
    run_dir, rows = chained_run
    tok = load_tokenizer(str(run_dir / "rm" / "model"))
    rm = load_pretrained(run_dir / "rm" / "model")
    assert rm.config.num_labels == 1
    wins = [rm_score(rm, tok, r["prompt"], r["chosen"]) > rm_score(rm, tok, r["prompt"], r["rejected"]) for r in rows]
    assert sum(wins) / len(wins) >= 0.8
