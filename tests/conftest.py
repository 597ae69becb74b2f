"""Shared fixtures: tiny causal LMs built from configs (no network), a toy tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_gpt2():
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


def tiny_neox(parallel: bool = True):
    config = GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
    )
    return GPTNeoXForCausalLM(config)


def tiny_llama():
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


TINY_MODELS = {
    "gpt2": tiny_gpt2,
    "neox_parallel": tiny_neox,
    "neox_sequential": lambda: tiny_neox(False),
    "llama": tiny_llama,
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    torch.manual_seed(0)
    return TINY_MODELS[request.param]().eval()


class ToyTokenizer:
    """Whitespace tokenizer over a growing vocabulary; id 0 BOS, 1 EOS, 2 PAD."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
    all_special_ids = [0, 1, 2]

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault(word, 3 + len(self.vocab)) for word in text.split()]
        return {"input_ids": ids}


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()
