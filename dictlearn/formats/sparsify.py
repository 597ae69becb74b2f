"""EleutherAI/sparsify folders (one per hookpoint: ``cfg.json`` + ``sae.safetensors``, sparsify 1.3): TopK SAEs and
transcoders, with and without the skip connection, both ways.

The hookpoint is the folder's name, a module path under the model's ``base_model`` (the files do not name the
model): ``layers.6`` is that block's output (``blocks.6.hook_resid_post``); ``layers.6.mlp`` is the MLP's output
for an SAE, and for a transcoder (``transcode``) the MLP's input (``blocks.6.ln2.hook_normalized``) to its
output (``blocks.6.hook_mlp_out``). GPT-2 names its blocks ``h.6``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dictlearn.errors import UserError
from dictlearn.files import read_json, read_safetensors, write_json
from dictlearn.formats.dictionary_learning import copy_weights_, sizes_from
from dictlearn.sae.base import SparseAutoencoder
from dictlearn.sae.topk import TopKSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

_SHAPES = {"encoder.weight": ("F", "D"), "encoder.bias": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",)}
_HOOKPOINT_RE = re.compile(r"^(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")


def hooks_of_hookpoint(name: str, transcode: bool) -> tuple[str | None, str | None]:
    """(hook, target_hook) in our names for a sparsify hookpoint; (None, None) when it is not one we know."""
    match = _HOOKPOINT_RE.match(name)
    if match is None:
        return None, None
    layer, module = match.group(1), match.group(2)
    if module is None:
        hook = f"blocks.{layer}.hook_resid_post"
    elif module == "mlp":
        hook = f"blocks.{layer}.hook_mlp_out"
    else:
        hook = f"blocks.{layer}.hook_attn_out"
    if not transcode:
        return hook, None
    if module != "mlp":
        return None, None
    return f"blocks.{layer}.ln2.hook_normalized", hook


def hookpoint_of_hooks(hook: str | None, target_hook: str | None) -> str:
    """The sparsify hookpoint (Llama-style module names) for our hook names, or ``UserError``."""
    layer_site = re.match(r"^blocks\.(\d+)\.(.+)$", hook or "")
    if layer_site:
        layer, site = layer_site.groups()
        wanted = {
            ("hook_resid_post", None): f"layers.{layer}",
            ("hook_mlp_out", None): f"layers.{layer}.mlp",
            ("hook_attn_out", None): f"layers.{layer}.self_attn",
            ("ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"): f"layers.{layer}.mlp",
        }
        if (site, target_hook) in wanted:
            return wanted[(site, target_hook)]
    arrow = f" -> {target_hook}" if target_hook else ""
    raise UserError(
        f"sparsify has no hookpoint for {hook}{arrow}: it names a block's output (layers.L), its MLP or attention "
        "output, and MLP transcoders (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out)"
    )


def read_sparsify(folder: Path, device=None) -> tuple[TopKSAE, dict]:
    """(SAE, cfg) from a sparsify hookpoint folder."""
    cfg = read_json(folder / CFG_FILE, "sparsify cfg.json")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{folder / CFG_FILE}: sparsify activation {activation!r} is not supported; expected 'topk'")
    k, transcode, skip = cfg.get("k"), bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if not isinstance(k, int) or isinstance(k, bool):
        raise UserError(f"{folder / CFG_FILE}: expected k as an integer, found {k!r}")
    tensors = read_safetensors(folder / WEIGHTS_FILE, "sparsify weights")
    what = f"sparsify SparseCoder ({folder / WEIGHTS_FILE})"
    shapes = {**_SHAPES, "W_skip": ("D", "D")} if skip else _SHAPES
    sizes = sizes_from(tensors, shapes, "encoder.weight", what)
    sae = TopKSAE(
        sizes["D"],
        sizes["F"],
        k,
        d_out=sizes["D"] if transcode else None,
        skip_connection=skip,
        dtype=tensors["encoder.weight"].dtype,
        device=device,
    )
    copy_weights_(sae, tensors["encoder.weight"], tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"])
    if skip:
        with torch.no_grad():
            sae.W_skip.copy_(tensors["W_skip"])
    return sae, cfg


def _unit_norm_rows(W_dec: torch.Tensor) -> bool:
    return bool(torch.allclose(W_dec.detach().norm(dim=-1), torch.ones(()), atol=1e-5))


def write_sparsify(folder: Path, sae: SparseAutoencoder, hook: str | None, target_hook: str | None) -> Path:
    """``<folder>/<hookpoint>/cfg.json`` and ``sae.safetensors`` as ``SparseCoder.save_to_disk`` writes them;
    returns the hookpoint folder. Only TopK SAEs and transcoders (sparsify's one activation kept per row)."""
    from safetensors.torch import save_file

    if sae.architecture != "topk" or getattr(sae, "input_norm", False):
        kind = "an input-normalised (OpenAI TopK) SAE" if sae.architecture == "topk" else f"a {sae.architecture} SAE"
        raise UserError(f"sparsify has no class that holds {kind} exactly (it keeps the top k per row, unnormalised)")
    transcode = bool(sae.transcoder)
    if sae.d_out != sae.d_in:
        raise UserError(f"sparsify transcoders have equal input and output widths; found {sae.d_in} -> {sae.d_out}")
    hookpoint = folder / hookpoint_of_hooks(hook, target_hook if transcode else None)
    tensors = {
        "encoder.weight": sae.W_enc.detach(),
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip.detach()
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.num_latents // sae.d_in),
        # sparsify renormalises the decoder rows after every training step when this is set: claim it only for
        # rows that are unit-norm already (a SAELens TopK with free decoder norms is not), so that training on in
        # sparsify does not first rescale the dictionary it was given.
        "normalize_decoder": not transcode and _unit_norm_rows(sae.W_dec),
        "num_latents": sae.num_latents,
        "k": int(sae.k),
        "multi_topk": False,
        "skip_connection": sae.W_skip is not None,
        "transcode": transcode,
        "d_in": sae.d_in,
    }
    hookpoint.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.cpu().contiguous() for name, tensor in tensors.items()}, str(hookpoint / WEIGHTS_FILE))
    write_json(hookpoint / CFG_FILE, cfg)
    return hookpoint
