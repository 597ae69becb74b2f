"""Hook points: every name captures the right activation on GPT-2, GPT-NeoX and Llama, and the forward
stops at the hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dictlearn.errors import UserError
from dictlearn.lm.models import ARCHITECTURES, SITES, capture_activations, hook_width, resolve_hook
from dictlearn.params import parse_params
from tests.conftest import tiny_gpt2, tiny_neox

REPO = Path(__file__).resolve().parents[1]


def _ids():
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _capture(model, name):
    return capture_activations(model, resolve_hook(model.config, name), _ids())


def _parallel(model):
    return bool(getattr(model.config, "use_parallel_residual", False))


def test_residual_hooks_equal_hidden_states(tiny_model):
    with torch.no_grad():
        hidden = tiny_model(_ids(), output_hidden_states=True).hidden_states
        for layer in range(tiny_model.config.num_hidden_layers):
            torch.testing.assert_close(_capture(tiny_model, f"blocks.{layer}.hook_resid_pre"), hidden[layer])
        # The last entry of hidden_states has the final norm applied, so compare resid_post below the top.
        for layer in range(tiny_model.config.num_hidden_layers - 1):
            torch.testing.assert_close(_capture(tiny_model, f"blocks.{layer}.hook_resid_post"), hidden[layer + 1])


def test_attn_and_mlp_outputs_add_up_to_the_residual_stream(tiny_model):
    with torch.no_grad():
        for layer in range(tiny_model.config.num_hidden_layers):
            pre, post, attn, mlp = (
                _capture(tiny_model, f"blocks.{layer}.{site}")
                for site in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
            )
            torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)
            if not _parallel(tiny_model):
                torch.testing.assert_close(_capture(tiny_model, f"blocks.{layer}.hook_resid_mid"), pre + attn)


def test_mlp_hook_post_is_what_the_output_projection_reads(tiny_model):
    arch = ARCHITECTURES[tiny_model.config.model_type]
    with torch.no_grad():
        hook = resolve_hook(tiny_model.config, "blocks.1.mlp.hook_post")
        post = capture_activations(tiny_model, hook, _ids())
        down = tiny_model.get_submodule(f"{arch.layers}.1.{arch.mlp_down}")
        torch.testing.assert_close(down(post), _capture(tiny_model, "blocks.1.hook_mlp_out"))
        assert post.shape[-1] == hook_width(tiny_model.config, hook) != tiny_model.config.hidden_size


def test_layers_past_the_hook_never_run(tiny_model):
    arch = ARCHITECTURES[tiny_model.config.model_type]
    calls = []
    blocks = tiny_model.get_submodule(arch.layers)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=index: calls.append(i))
    tiny_model.get_output_embeddings().register_forward_hook(lambda *_: calls.append("lm_head"))
    tiny_model.get_submodule(arch.final_norm).register_forward_hook(lambda *_: calls.append("final_norm"))
    for site in SITES:
        if site == "hook_resid_mid" and _parallel(tiny_model):
            continue
        calls.clear()
        _capture(tiny_model, f"blocks.1.{site}")
        assert all(c in (0, 1) for c in calls), (site, calls)


def test_hook_errors_name_the_valid_hooks():
    config = tiny_gpt2().config
    with pytest.raises(UserError, match=r"unknown hook name 'blocks\.1\.resid'.*blocks\.\{0\.\.2\}\.hook_resid_post"):
        resolve_hook(config, "blocks.1.resid")
    with pytest.raises(UserError, match=r"layer 7 out of range .*layers 0\.\.2"):
        resolve_hook(config, "blocks.7.hook_mlp_out")
    with pytest.raises(UserError, match="parallel-residual"):
        resolve_hook(tiny_neox(parallel=True).config, "blocks.0.hook_resid_mid")


def test_dictionary_learning_aliases():
    config = tiny_gpt2().config
    assert resolve_hook(config, "mlp_out_layer2").name == "blocks.2.hook_mlp_out"
    assert resolve_hook(config, "resid_out_layer0").name == "blocks.0.hook_resid_post"
    assert resolve_hook(config, "resid_post_layer_1").name == "blocks.1.hook_resid_post"


@pytest.mark.parametrize(
    ("preset", "make_tiny", "layers"), [("pythia-70m-deduped.json", tiny_neox, 6), ("gpt2-small.json", tiny_gpt2, 12)]
)
def test_presets_resolve_on_their_architecture(preset, make_tiny, layers):
    params = parse_params(json.loads((REPO / "configs" / preset).read_text()), source=preset)
    config = make_tiny().config
    config.num_hidden_layers = layers
    hook = resolve_hook(config, params.hook)
    assert hook.module_path.split(".")[0] in ("gpt_neox", "transformer")
    assert params.data.source == "hub"
