"""The one reward-model scorer (`alignment.models.RewardScorer`): it feeds the model the token ids TRL's
RewardTrainer trained it on, and the PPO reward and the evals score a (prompt, completion) the same."""
from __future__ import annotations

import json

import pytest

from alignment.models import ARTIFACT_FILE, load_tokenizer, reward_input_ids
from alignment.rollout import Completion

CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "1+1="}],
     "chosen": [{"role": "assistant", "content": "2"}], "rejected": [{"role": "assistant", "content": "no idea"}]},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
]
TEXT_PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
              {"prompt": "Q: 12+30?\nA: ", "chosen": "42", "rejected": "forty"}]
# implicit prompts: the shared prefix is the prompt (alignment.data.split_prompt, as the evals split them)
IMPLICIT_CHAT = [{"chosen": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}],
                  "rejected": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "8"}]}]
IMPLICIT_TEXT = [{"chosen": "5+5=10", "rejected": "5+5=11"}]


def _bos_tokenizer(path):
    """The tiny tokenizer, adding a BOS token (`<|im_start|>`) to plain text as many tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(str(path))
    bos = "<|im_start|>"
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    assert tok("a")["input_ids"][0] == tok.convert_tokens_to_ids(bos)
    return tok


def _reward_model(path, seed: int = 0):
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(AutoConfig.from_pretrained(path, num_labels=1))


def _trainer_ids(tokenizer, model_path, rows, tmp_path) -> list[tuple[list[int], list[int]]]:
    """(chosen_ids, rejected_ids) per row of RewardTrainer's own tokenized train dataset."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(tmp_path / "trainer"), report_to="none", max_length=None, bf16=False)
    trainer = RewardTrainer(model=_reward_model(model_path), args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(rows))
    return list(zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"]))


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("rows", [CHAT_PAIRS, TEXT_PAIRS, IMPLICIT_CHAT, IMPLICIT_TEXT],
                         ids=["chat", "text", "implicit-chat", "implicit-text"])
def test_scorer_tokenizes_as_reward_trainer_trained(tiny_model_path, tmp_path, rows, bos):
    from alignment.data import split_prompt

    tok = _bos_tokenizer(tiny_model_path) if bos else load_tokenizer(str(tiny_model_path))
    trained = _trainer_ids(tok, tiny_model_path, rows, tmp_path)
    for row, (chosen_ids, rejected_ids) in zip(rows, trained):
        prompt, chosen, rejected = split_prompt(row)
        assert reward_input_ids(tok, prompt, chosen) == chosen_ids
        assert reward_input_ids(tok, prompt, rejected) == rejected_ids
        if isinstance(prompt, str):  # plain text ends in EOS, which PPO's scorer used to leave out
            assert chosen_ids[-1] == tok.eos_token_id
    # evals and PPO pass a chat completion as a string or as messages: the same ids
    prompt, chosen, _ = split_prompt(CHAT_PAIRS[0])
    assert reward_input_ids(tok, prompt, chosen[0]["content"]) == reward_input_ids(tok, prompt, chosen)


@pytest.fixture
def rm_run(tiny_model_path, tmp_path):
    """A run directory whose `rm` stage holds a (random) reward model artifact."""
    folder = tmp_path / "run" / "rm" / "model"
    _reward_model(tiny_model_path, seed=3).save_pretrained(folder)
    load_tokenizer(str(tiny_model_path)).save_pretrained(folder)
    (folder / ARTIFACT_FILE).write_text(json.dumps({"kind": "full", "base": None, "head": "sequence_classification"}))
    return tmp_path / "run"


def test_ppo_reward_and_eval_score_a_completion_the_same(rm_run, tiny_model_path):
    """PPO: the `reward_model` reward through the loader `alignment.stage` installs, fed as PPO feeds it;
    evals: the `reward_score` task on the same completions."""
    from alignment.stage import _install_reward_model_loader
    from alignment.stages.ppo import _reward_fn
    from evals import TASKS, EvalContext
    from rewards import combine_rewards, set_stage_model_loader

    rows = [{"prompt": "1+1="}, {"prompt": [{"role": "user", "content": "2+3="}]}, {"prompt": "a longer one: 4+4="}]
    texts = ["2", "5", "eight, I think"]
    completions = [Completion(prompt_ids=[], completion_ids=[], text=t, logprobs=[], finish_reason="stop") for t in texts]

    _install_reward_model_loader(rm_run)
    try:
        funcs, weights = combine_rewards([{"name": "reward_model", "stage": "rm"}])
        ppo_scores, _ = _reward_fn(funcs, weights, rows, num_generations=1)(completions)
    finally:
        set_stage_model_loader(None)

    ctx = EvalContext(model_path=str(tiny_model_path), rows=rows)
    ctx.generate = lambda prompts, max_new_tokens, n=1, temperature=0.0, model_path=None: [[c] for c in completions]
    result = TASKS.get("reward_score")(ctx, reward_stage=str(rm_run / "rm" / "model"))
    eval_scores = [s["score"] for s in result.samples]
    assert eval_scores == pytest.approx(ppo_scores, abs=1e-6) and len(set(eval_scores)) == 3

    # and both equal one plain forward pass over RewardTrainer's ids
    import torch

    model = _reward_model(tiny_model_path, seed=3).eval()
    tok = load_tokenizer(str(tiny_model_path))
    for row, text, score in zip(rows, texts, eval_scores):
        ids = torch.tensor([reward_input_ids(tok, row["prompt"], text)])
        with torch.no_grad():
            assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)
    ctx.session.release()

