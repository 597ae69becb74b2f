"""Hook points: every name captures the right activation on GPT-2, GPT-NeoX and Llama, and the forward
stops at the hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dictlearn.errors import UserError
from dictlearn.lm.models import (
    ARCHITECTURES,
    SITES,
    capture_activations,
    capture_at_hooks,
    hook_width,
    resolve_hook,
    resolve_hooks,
)
from dictlearn.params import parse_params
from tests.conftest import ToyTokenizer, tiny_gpt2, tiny_neox

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


def test_mlp_in_is_what_the_mlp_reads_and_gives_mlp_out(tiny_model):
    arch = ARCHITECTURES[tiny_model.config.model_type]
    with torch.no_grad():
        mlp_in = _capture(tiny_model, "blocks.1.ln2.hook_normalized")
        mlp = tiny_model.get_submodule(f"{arch.layers}.1.{arch.mlp}")
        torch.testing.assert_close(mlp(mlp_in), _capture(tiny_model, "blocks.1.hook_mlp_out"))
        if not _parallel(tiny_model):  # after the norm: not the residual itself
            assert not torch.allclose(mlp_in, _capture(tiny_model, "blocks.1.hook_resid_mid"))
    assert hook_width(tiny_model.config, resolve_hook(tiny_model.config, "blocks.1.ln2.hook_normalized")) == 32


def test_hook_patterns_expand_in_order_without_repeats():
    config = tiny_gpt2().config
    names = lambda spec: [hook.name for hook in resolve_hooks(config, spec)]  # noqa: E731
    assert names("blocks.*.hook_resid_post") == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert names("blocks.{2,0}.hook_mlp_out") == ["blocks.2.hook_mlp_out", "blocks.0.hook_mlp_out"]
    assert names("blocks.{0..1}.{ln2.hook_normalized,hook_mlp_out}") == [
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
    ]
    assert names(["blocks.1.hook_mlp_out", "mlp_out_layer1", "blocks.0.hook_resid_pre"]) == [
        "blocks.1.hook_mlp_out",
        "blocks.0.hook_resid_pre",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blocks.{1,}.hook_mlp_out", r"^hook: empty item in \{1,\} in 'blocks\.\{1,\}\.hook_mlp_out'; write a set"),
        ("blocks.{2..1}.hook_mlp_out", r"^hook: empty range \{2\.\.1\}"),
        ("blocks.{1,2.hook_mlp_out", r"^hook: unbalanced braces in 'blocks\.\{1,2\.hook_mlp_out'"),
        ("blocks.1*.hook_mlp_out", r"^hook: '\*' stands for a whole layer number"),
        ("*.hook_mlp_out", r"^hook: '\*' stands for the layer number"),
        (
            "blocks.{0..5}.hook_mlp_out",
            r"^hook: layer 3 out of range in 'blocks\.3\.hook_mlp_out'; this model has layers 0\.\.2$",
        ),
        ("blocks.*.hook_mlp", r"^hook: unknown hook name 'blocks\.0\.hook_mlp'; valid for this model: "),
    ],
)
def test_bad_hook_patterns_are_one_line(spec, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_hooks(tiny_gpt2().config, spec)
    assert "\n" not in str(err.value)


def test_an_empty_hook_list_is_refused_by_the_params():
    with pytest.raises(
        UserError, match=r"^params: hook: expected a hook name, a pattern .* or a non-empty list of them, found \[\]$"
    ):
        parse_params({"hook": []})


def test_multi_hook_capture_equals_single_hook_captures(tiny_model):
    hooks = resolve_hooks(
        tiny_model.config, ["blocks.2.hook_resid_post", "blocks.0.ln2.hook_normalized", "blocks.1.mlp.hook_post"]
    )
    with torch.no_grad():
        together = capture_at_hooks(tiny_model, hooks, _ids())
        for hook in hooks:
            assert torch.equal(together[hook.name], capture_activations(tiny_model, hook, _ids())), hook.name


def test_live_chunk_sets_equal_one_hook_sources(tiny_model):
    from dictlearn.activations.harvest import LiveActivations, SharedPass
    from dictlearn.lm.models import LanguageModel

    lm = LanguageModel(tiny_model, ToyTokenizer(), "tiny", torch.device("cpu"), torch.float32)
    windows = lambda: iter(torch.randint(3, 100, (10, 9), generator=torch.Generator().manual_seed(2)).tolist())  # noqa: E731
    hooks = resolve_hooks(tiny_model.config, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    shared = SharedPass(LiveActivations(lm, hooks, windows, 4).iter_chunk_sets)
    paired, outputs = shared.source([h.name for h in hooks]), shared.source([hooks[1].name])
    for start in (0, 1):
        for pair, out, (single_in, single_out) in zip(
            paired(start),
            outputs(start),
            zip(*(LiveActivations(lm, hook, windows, 4).iter_chunks(start) for hook in hooks)),
            strict=True,
        ):
            assert torch.equal(pair.acts, torch.cat([single_in.acts, single_out.acts], 1))
            assert torch.equal(out.acts, single_out.acts) and torch.equal(out.token_ids, single_out.token_ids)
    assert len(shared.cache) <= 1
