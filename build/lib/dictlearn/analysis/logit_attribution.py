"""Direct logit attribution (DLA) of each latent: its decoder direction read straight through the model's final
norm and unembedding, giving the output tokens it promotes and suppresses.

For latent f with decoder row ``d = W_dec[f]`` written into the residual stream, ``dla_f = W_U (g * d')`` where
``g`` is the final norm's elementwise weight and ``d' = d - mean(d)`` for a LayerNorm (which removes the mean of
whatever is written to the stream), ``d' = d`` for an RMSNorm. The norm's scale ``1 / sigma(x)`` depends on the
whole residual stream, not on the latent, so it is treated as a constant, as TransformerLens does with folded
LayerNorm (``fold_ln`` folds ``g`` into ``W_U``, ``center_writing_weights`` removes the mean) and as the direct
path of Elhage et al. 2021 ("A Mathematical Framework for Transformer Circuits") reads a direction's effect on
the logits; the norm's bias adds the same to every latent and is left out. This is OpenMOSS Language-Model-SAEs'
``direct_logit_attribute`` and the "logit weights" of Bricken et al. 2023. ``W_U`` is the output embedding, the
input embedding itself when the model ties them (GPT-2, SmolLM2). A latent at ``mlp.hook_post`` writes to the
stream through the MLP's output projection, which is applied first.

Shape letters: F latents, D residual width, H hook width (D, or the MLP's hidden width), V vocabulary,
T tokens kept per latent, C latents in a chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dictlearn.errors import UserError
from dictlearn.lm.models import HookPoint, architecture_of

# Latents per product with W_U: the (C, V) logits of SmolLM2's 49k-token vocabulary take 50 MB.
_CHUNK = 256


class LogitAttribution(NamedTuple):
    promoted_values_FT: torch.Tensor  # (F, T) the largest logits, descending
    promoted_ids_FT: torch.Tensor  # (F, T) their token ids
    suppressed_values_FT: torch.Tensor  # (F, T) the most negative logits, ascending
    suppressed_ids_FT: torch.Tensor


def residual_directions(model: nn.Module, hook: HookPoint, W_dec_FH: torch.Tensor) -> torch.Tensor:
    """(F, D) what each latent's decoder row writes into the residual stream: the row itself, or, at
    ``mlp.hook_post``, the row through the MLP's output projection (without its bias)."""
    if hook.site != "mlp.hook_post":
        return W_dec_FH
    down = model.get_submodule(hook.module_path)
    weight = next(down.parameters())
    rows_FH = W_dec_FH.to(weight.dtype)
    return (down(rows_FH) - down(torch.zeros_like(rows_FH[:1]))).float()


def folded_unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(W_U (V, D), g (D,), centre)``: the output embedding, the final norm's weight, and whether the norm is a
    LayerNorm (directions are centred) rather than an RMSNorm."""
    norm = model.get_submodule(architecture_of(model.config).final_norm)
    if isinstance(norm, nn.LayerNorm):
        centre = True
    elif type(norm).__name__.endswith("RMSNorm"):
        centre = False
    else:
        raise UserError(f"direct logit attribution: the final norm {type(norm).__name__} is not a LayerNorm or RMSNorm")
    return model.get_output_embeddings().weight.float(), norm.weight.float(), centre


@torch.no_grad()
def logit_attribution(
    model: nn.Module, hook: HookPoint, W_dec_FH: torch.Tensor, top: int, vocab_size: int | None = None
) -> LogitAttribution:
    """Each latent's ``top`` most promoted and most suppressed tokens among the first ``vocab_size`` (the
    tokenizer's; an unembedding padded past it has rows no token reads)."""
    W_U_VD, gain_D, centre = folded_unembedding(model)
    W_U_VD = W_U_VD[:vocab_size].to(W_dec_FH.device)
    gain_D = gain_D.to(W_dec_FH.device)
    directions_FD = residual_directions(model, hook, W_dec_FH.float())
    if centre:
        directions_FD = directions_FD - directions_FD.mean(1, keepdim=True)
    parts = []
    for chunk_CD in (directions_FD * gain_D).split(_CHUNK):
        logits_CV = chunk_CD @ W_U_VD.T
        promoted, suppressed = logits_CV.topk(top, dim=1), logits_CV.topk(top, dim=1, largest=False)
        parts.append((promoted.values, promoted.indices, suppressed.values, suppressed.indices))
    return LogitAttribution(*(torch.cat(column).cpu() for column in zip(*parts)))
