"""Shared fixtures: tiny causal LMs built from configs (no network), a toy tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_gpt2():
    config = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=101,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        initializer_range=0.2,
    )
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


WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "that",
    "he",
    "she",
    "her",
    "his",
    "they",
    "we",
    "you",
    "said",
    "very",
    "much",
    "would",
    "could",
    "not",
    "be",
    "have",
    "had",
    "been",
    "there",
    "which",
    "when",
    "what",
    "all",
    "one",
    "so",
    "no",
    "more",
    "time",
    "must",
    "know",
    "think",
    "good",
    "little",
    "such",
]


def write_dictionary(folder, sae, model: str, hook: str, **trainer) -> None:
    """Save ``sae`` as a run folder trained on ``model`` at ``hook``, as training writes it (plus ``trainer``
    fields)."""
    from dictlearn.formats.dictionary_learning import to_dictionary_learning
    from dictlearn.formats.run_folder import save_dictionary

    config = {
        "trainer": {"dict_class": to_dictionary_learning(sae)[0], "lm_name": model, "submodule_name": hook, **trainer}
    }
    save_dictionary(folder, sae, config)


def write_corpus(path, sentences: int = 3000, seed: int = 0) -> None:
    """A small text file of word-salad sentences over ``WORDS``."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + " ." for _ in range(sentences)]
    path.write_text("\n\n".join(lines))


def word_tokenizer():
    """A real fast tokenizer (WordLevel over ``WORDS``) with BOS/EOS/PAD, savable with a checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3, ".": 4}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_checkpoint_with_text(tmp_path_factory):
    """A tiny Llama checkpoint with a word-level tokenizer, and a corpus file it can read."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = tiny_llama()
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 2
    model.save_pretrained(folder / "model")
    word_tokenizer().save_pretrained(folder / "model")
    write_corpus(folder / "corpus.txt")
    return folder / "model", folder / "corpus.txt"


@pytest.fixture(scope="session")
def smollm_with_sae():
    """The embedded SmolLM2 at blocks.6.hook_resid_post with a small random TopK SAE (slow tests only)."""
    from dictlearn.cli import quiet_transformers
    from dictlearn.lm.models import load_language_model, resolve_hook
    from dictlearn.params import ModelParams
    from dictlearn.sae.topk import TopKSAE

    quiet_transformers()
    lm = load_language_model(ModelParams(device="cpu"))
    return lm, resolve_hook(lm.config, "blocks.6.hook_resid_post"), TopKSAE(576, 1152, 16, seed=0)
