"""Evaluating a dictionary on held-out text: FVU, L0, dead fraction, feature density, and the language
model's loss with the reconstruction spliced in at the hook, versus clean and versus zero-ablated.

Splicing replaces the activation only at text positions (the BOS/EOS/padding positions the dictionary never
saw in training keep their clean values), and the loss is the next-token loss on text targets. The fraction
of loss recovered is (zero - spliced) / (zero - clean), as in SAELens and Gao et al. 2024 (section 4.1 uses
the same clean/spliced comparison).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

import torch
import torch.nn.functional as F

from dictlearn.activations.harvest import LiveActivations, batched
from dictlearn.lm.models import HookPoint, LanguageModel
from dictlearn.lm.text import first_windows, held_out_windows
from dictlearn.sae.base import SparseAutoencoder


@torch.no_grad()
def reconstruction_stats(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict:
    """FVU over all rows (error energy / energy about the mean), mean L0, dead fraction, per-latent density."""
    rows = 0
    sum_D = sq_sum = err_sum = l0_sum = 0.0
    fired_F = torch.zeros(sae.num_latents, dtype=torch.long)
    for x_BD in batches:
        x_BD = x_BD.to(sae.W_dec.device, sae.W_dec.dtype)
        out = sae(x_BD)
        err_sum += float((x_BD - out.x_hat).pow(2).sum())
        sum_D = sum_D + x_BD.double().sum(0)
        sq_sum += float(x_BD.double().pow(2).sum())
        active_BK = out.codes.values > 0
        l0_sum += float(active_BK.sum())
        fired_F += torch.bincount(out.codes.indices[active_BK].cpu(), minlength=sae.num_latents)
        rows += len(x_BD)
    if rows == 0:
        raise ValueError("no evaluation rows")
    total_variance = sq_sum - float((sum_D * sum_D).sum()) / rows
    density_F = fired_F.double() / rows
    return {
        "tokens": rows,
        "fvu": err_sum / total_variance,
        "l0": l0_sum / rows,
        "dead_fraction": float((fired_F == 0).double().mean()),
        "density": density_F,
    }


@contextmanager
def replace_at_hook(model, hook: HookPoint, replace):
    """Within the block, the activation at ``hook`` is replaced by ``replace(activation)``."""
    module = model.get_submodule(hook.module_path)
    if hook.capture == "input":

        def pre_hook(_module, args, kwargs):
            if args:
                return (replace(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_module, _args, output):
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_loss(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, text_BT: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting each text token from the one before it, and the count."""
    targets = input_ids_BT[:, 1:]
    mask = text_BT[:, 1:]
    losses = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return float(losses[mask.flatten()].sum()), int(mask.sum())


def _text_batches(
    lm: LanguageModel, windows: Iterable[list[int]], batch_size: int, excluded_ids: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of windows on the model's device, (B, T), with the mask of their text (not special) tokens."""
    for batch in batched(windows, batch_size):
        input_ids = torch.tensor(batch, dtype=torch.long)
        text_BT = ~torch.isin(input_ids, excluded_ids)
        yield input_ids.to(lm.device), text_BT.to(lm.device)


@torch.no_grad()
def lm_loss(
    lm: LanguageModel, windows: Iterable[list[int]], batch_size: int, excluded_ids: torch.Tensor
) -> tuple[float, int]:
    """The model's mean next-token loss on the text tokens of ``windows``, and the number of tokens averaged."""
    total, count = 0.0, 0
    for input_ids, text_BT in _text_batches(lm, windows, batch_size, excluded_ids):
        loss_sum, n = _next_token_loss(lm.model(input_ids).logits, input_ids, text_BT)
        total, count = total + loss_sum, count + n
    if count == 0:
        raise ValueError("no held-out windows for the LM loss")
    return total / count, count


def _reconstruct_at(sae: SparseAutoencoder, text_BT: torch.Tensor):
    """Replace the activation at text positions by the SAE's reconstruction of it."""

    def replace(acts_BTD: torch.Tensor) -> torch.Tensor:
        out = acts_BTD.clone()
        out[text_BT] = sae(acts_BTD[text_BT].to(sae.W_dec.dtype)).x_hat.to(acts_BTD.dtype)
        return out

    return replace


def _zero_at(text_BT: torch.Tensor):
    """Zero the activation at text positions (the zero-ablation baseline)."""
    return lambda acts_BTD: acts_BTD.masked_fill(text_BT[..., None], 0.0)


@torch.no_grad()
def spliced_lm_loss(
    lm: LanguageModel,
    hook: HookPoint,
    sae: SparseAutoencoder,
    windows: Iterator[list[int]],
    batch_size: int,
    excluded_ids,
) -> dict:
    """LM loss clean, with the SAE reconstruction spliced in at ``hook``, and with the activation zeroed."""
    totals = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    count = 0
    for input_ids, text_on_device in _text_batches(lm, windows, batch_size, excluded_ids):
        replacements = {
            "clean": None,
            "spliced": _reconstruct_at(sae, text_on_device),
            "zero_ablated": _zero_at(text_on_device),
        }
        for name, replace in replacements.items():
            if replace is None:
                logits = lm.model(input_ids).logits
            else:
                with replace_at_hook(lm.model, hook, replace):
                    logits = lm.model(input_ids).logits
            loss_sum, n = _next_token_loss(logits, input_ids, text_on_device)
            totals[name] += loss_sum
        count += n
    if count == 0:
        raise ValueError("no held-out windows for the LM loss")
    losses = {name: value / count for name, value in totals.items()}
    denominator = losses["zero_ablated"] - losses["clean"]
    losses["loss_recovered"] = (
        (losses["zero_ablated"] - losses["spliced"]) / denominator if denominator else float("nan")
    )
    losses["lm_loss_tokens"] = count
    return losses


def evaluate_dictionary(lm: LanguageModel, hook: HookPoint, sae: SparseAutoencoder, params) -> dict:
    """Held-out evaluation as configured by ``params.eval``: reconstruction stats, then the spliced LM loss."""
    source = LiveActivations(
        lm,
        hook,
        lambda: first_windows(held_out_windows(params.data, lm.tokenizer), params.data, params.eval.tokens),
        params.eval.batch_size,
        params.buffer.exclude_special_tokens,
    )
    result = reconstruction_stats(sae, (chunk.acts for chunk in source.iter_chunks()))
    if params.eval.lm_loss_windows:
        windows = islice(held_out_windows(params.data, lm.tokenizer), params.eval.lm_loss_windows)
        result.update(spliced_lm_loss(lm, hook, sae, windows, params.eval.batch_size, source.excluded))
    return result
