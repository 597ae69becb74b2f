"""Evaluating a dictionary on held-out text, to SAEBench's core standard: one streaming pass gives the
reconstruction and sparsity metrics (metrics.py) and the language model's loss and next-token KL with the
reconstruction spliced in at the hook, versus clean and versus zero-ablated; then the decoder's and encoder's
redundancy and, when asked, first-letter absorption (absorption.py).

The result's keys are SAEBench core's output names (``explained_variance``, ``ce_loss_score``,
``kl_div_score``, ``cossim``, ``l2_ratio``, ``relative_reconstruction_bias``, ``l0``, ``l1``, ``frac_alive``,
...) plus ``fvu`` and ``dead_fraction``, in one flat dict that becomes eval.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from itertools import islice
from math import nan
from string import ascii_lowercase
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dictlearn.activations.harvest import batched, special_token_ids
from dictlearn.errors import UserError
from dictlearn.evaluation.absorption import first_letter_absorption, letter_labels, vocabulary_words, word_activations
from dictlearn.evaluation.metrics import ReconstructionMetrics, mean_max_cosine_similarity
from dictlearn.lm.models import HookPoint, LanguageModel, capture_at_hooks
from dictlearn.lm.text import held_out_windows
from dictlearn.params import Params


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


def _zero_at(text_BT: torch.Tensor):
    """Zero the activation at text positions (the zero-ablation baseline)."""
    return lambda acts_BTD: acts_BTD.masked_fill(text_BT[..., None], 0.0)


def reconstruct(sae, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SAE's reconstruction of ``x_BD`` and its codes as plain tensors: x_hat (B, D), values and indices (B, K)."""
    out = sae(x_BD.to(sae.W_dec.dtype))
    return out.x_hat, out.codes.values, out.codes.indices


class LMLossBatch:
    """The terms of one batch that do not depend on the dictionary: the clean log-probabilities of the next
    text token, and the clean and zero-ablated losses and the zero-ablated KL, summed."""

    def __init__(self, clean_BTV, zero_BTV, input_ids_BT, text_BT):
        self.positions_BT = text_BT[:, 1:]
        self.targets_N = input_ids_BT[:, 1:][self.positions_BT]
        self.clean_NV = self.log_probs(clean_BTV)
        zero_NV = self.log_probs(zero_BTV)
        self.sums = {
            "clean": float(F.nll_loss(self.clean_NV, self.targets_N, reduction="sum")),
            "zero": float(F.nll_loss(zero_NV, self.targets_N, reduction="sum")),
            "kl_zero": float(F.kl_div(zero_NV, self.clean_NV, log_target=True, reduction="sum")),
        }

    def log_probs(self, logits_BTV: torch.Tensor) -> torch.Tensor:
        """(N, V) log-probabilities at the predictions of text tokens."""
        return logits_BTV[:, :-1][self.positions_BT].float().log_softmax(-1)


class LMLossSums:
    """Sums of the next-token loss (clean, spliced, zero-ablated) and of the KL divergence of the spliced and
    zero-ablated next-token distributions from the clean one, over text targets.

    ``result()`` follows SAEBench core (``evals/core/main.py``) and SAELens ``evals.py``
    (``get_downstream_reconstruction_metrics``):
    ``ce_loss_score = (ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae)``
    (the fraction of loss recovered, Gao et al. 2024 section 4.1 compares the same clean and spliced losses), and
    ``kl_div_score = (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation`` with
    ``kl = sum_v p_clean(v) (log p_clean(v) - log p(v))`` averaged over the same positions as the loss.
    """

    def __init__(self):
        self.count = 0
        self.sums = dict.fromkeys(("clean", "spliced", "zero", "kl_spliced", "kl_zero"), 0.0)

    def update(self, clean_BTV, spliced_BTV, zero_BTV, input_ids_BT, text_BT) -> None:
        self.add(LMLossBatch(clean_BTV, zero_BTV, input_ids_BT, text_BT), spliced_BTV)

    def add(self, batch: LMLossBatch, spliced_BTV: torch.Tensor) -> None:
        """One batch: its clean and zero-ablated terms (computed once for every dictionary spliced into it) and
        the spliced forward's."""
        spliced_NV = batch.log_probs(spliced_BTV)
        self.sums["spliced"] += float(F.nll_loss(spliced_NV, batch.targets_N, reduction="sum"))
        self.sums["kl_spliced"] += float(F.kl_div(spliced_NV, batch.clean_NV, log_target=True, reduction="sum"))
        for name in ("clean", "zero", "kl_zero"):
            self.sums[name] += batch.sums[name]
        self.count += len(batch.targets_N)

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("no held-out tokens for the LM loss")
        mean = {name: value / self.count for name, value in self.sums.items()}
        recovered_denominator = mean["zero"] - mean["clean"]
        ce_loss_score = (mean["zero"] - mean["spliced"]) / recovered_denominator if recovered_denominator else nan
        kl_div_score = (mean["kl_zero"] - mean["kl_spliced"]) / mean["kl_zero"] if mean["kl_zero"] else nan
        return {
            "ce_loss_without_sae": mean["clean"],
            "ce_loss_with_sae": mean["spliced"],
            "ce_loss_with_ablation": mean["zero"],
            "ce_loss_score": ce_loss_score,
            "kl_div_with_sae": mean["kl_spliced"],
            "kl_div_with_ablation": mean["kl_zero"],
            "kl_div_score": kl_div_score,
            "lm_loss_tokens": self.count,
            # The names eval.json used before the SAEBench ones; report/common.py's evaluation_rows reads them.
            "clean": mean["clean"],
            "spliced": mean["spliced"],
            "zero_ablated": mean["zero"],
            "loss_recovered": ce_loss_score,
        }


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return False

    def update(self, _n: int = 1) -> None:
        pass


def no_progress(_description: str, _total: int) -> _NoBar:
    return _NoBar()


Progress = Callable[[str, int], AbstractContextManager]
"""``progress(description, total)`` gives a context manager with ``update(n)``; ``tqdm``'s signature fits
(``lambda d, t: tqdm(desc=d, total=t)``). The package never prints: scripts pass a bar, the default is none."""


@torch.no_grad()
def held_out_pass(lm: LanguageModel, hook: HookPoint, sae, windows: Iterable[list[int]], **options) -> dict:
    """``held_out_passes`` for one dictionary."""
    return held_out_passes(lm, hook, [sae], windows, **options)[0]


@torch.no_grad()
def held_out_passes(
    lm: LanguageModel,
    hook: HookPoint,
    saes: Sequence,
    windows: Iterable[list[int]],
    *,
    batch_size: int,
    excluded_ids: torch.Tensor,
    lm_loss_windows: int,
    on_batch: Callable[[int], None] = lambda _n: None,
    target_hook: HookPoint | None = None,
) -> list[dict]:
    """Every metric of one pass over ``windows``, for each of ``saes`` (all at ``hook``): reconstruction and
    sparsity on all of them, and for the first ``lm_loss_windows`` (rounded up to whole batches) also the LM loss
    and KL clean / spliced / zero-ablated.

    Splicing and zero-ablation touch only text positions (BOS, EOS and padding, which the dictionary never saw
    in training, keep their clean values), and losses and KL are taken at predictions of text tokens. On the
    LM batches the reconstruction metrics come from the activation the spliced forward sees, so each batch
    runs the model twice (clean, zero-ablated) and once more per dictionary (spliced); past them the forward
    stops at the hook and every dictionary reads the same activations. The dictionaries share everything but
    their own spliced forward, so comparing several costs little more than evaluating one. ``on_batch(tokens)``
    is called after each batch with its text-token count.

    A transcoder (``target_hook`` set) reads ``hook`` and is spliced in at ``target_hook``: in the same forward
    the activation at ``hook`` is kept as it is, and the one at ``target_hook`` is replaced by the transcoder's
    output for it; the metrics compare that output with the target activation, and the zero-ablation baseline
    zeroes the target.
    """
    site = target_hook or hook
    metrics = [ReconstructionMetrics(sae.num_latents) for sae in saes]
    losses = [LMLossSums() for _ in saes]
    windows_done = 0
    for input_ids, text_BT in _text_batches(lm, windows, batch_size, excluded_ids):
        if windows_done < lm_loss_windows:
            clean = lm.model(input_ids).logits
            with replace_at_hook(lm.model, site, _zero_at(text_BT)):
                zero = lm.model(input_ids).logits
            batch = LMLossBatch(clean, zero, input_ids, text_BT)
            del clean, zero
            for sae, sae_metrics, sae_losses in zip(saes, metrics, losses, strict=True):
                sae_losses.add(batch, _spliced_logits(lm, hook, target_hook, sae, sae_metrics, input_ids, text_BT))
        else:
            acts = capture_at_hooks(lm.model, [hook, site], input_ids)
            x_BD, y_BD = acts[hook.name][text_BT], acts[site.name][text_BT]
            for sae, sae_metrics in zip(saes, metrics, strict=True):
                sae_metrics.update(y_BD, *reconstruct(sae, x_BD))
        windows_done += len(input_ids)
        on_batch(int(text_BT.sum()))
    results = []
    for sae_metrics, sae_losses in zip(metrics, losses, strict=True):
        result = sae_metrics.result()
        if sae_losses.count:
            result.update(sae_losses.result())
        results.append(result)
    return results


def _spliced_logits(lm, hook, target_hook, sae, metrics, input_ids, text_BT) -> torch.Tensor:
    """The logits with ``sae``'s reconstruction spliced in at the text positions of its site; the reconstruction
    metrics are updated with the activation that forward sees."""
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(acts_BTD: torch.Tensor) -> torch.Tensor:
        inputs["x"] = acts_BTD
        return acts_BTD

    def splice(acts_BTD: torch.Tensor) -> torch.Tensor:
        y_BD = acts_BTD[text_BT]
        x_BD = inputs["x"][text_BT] if target_hook is not None else y_BD
        y_hat_BD, values_BK, indices_BK = reconstruct(sae, x_BD)
        metrics.update(y_BD, y_hat_BD, values_BK, indices_BK)
        out = acts_BTD.clone()
        out[text_BT] = y_hat_BD.to(acts_BTD.dtype)
        return out

    with ExitStack() as hooks:
        if target_hook is not None:
            hooks.enter_context(replace_at_hook(lm.model, hook, keep_input))
        hooks.enter_context(replace_at_hook(lm.model, target_hook or hook, splice))
        return lm.model(input_ids).logits


class EvalSize(NamedTuple):
    """How much one evaluation reads."""

    tokens: int  # held-out text tokens for reconstruction and sparsity
    lm_loss_tokens: int  # of those (or more, if larger), the tokens that also get the LM loss and KL; 0 skips
    absorption_words: int  # vocabulary words for the absorption task; 0 skips


def post_train_size(params: Params) -> EvalSize:
    """training_script.py's evaluation after training: ``eval.tokens`` and ``eval.lm_loss_windows``, affordable
    on a CPU at the end of every run; numbers from it are indicative, not the ones to report."""
    per_window = params.data.context_size - int(params.data.prepend_bos)
    return EvalSize(params.eval.tokens, params.eval.lm_loss_windows * per_window, 0)


def full_size(params: Params) -> EvalSize:
    """evaluate.py's evaluation: ``eval.evaluate_tokens``, ``eval.evaluate_lm_loss_tokens`` and
    ``eval.absorption_words``, large enough to compare dictionaries."""
    return EvalSize(params.eval.evaluate_tokens, params.eval.evaluate_lm_loss_tokens, params.eval.absorption_words)


def shared_pass_key(hook: HookPoint, target_hook: HookPoint | None, params: Params) -> str:
    """All that ``evaluate_dictionaries``' held-out pass reads besides the dictionaries: the hook (and target
    hook), the held-out text, the evaluation sizes and the excluded tokens. Dictionaries on one loaded model with
    equal keys can share one pass."""
    reads = [hook.name, target_hook.name if target_hook is not None else None]
    sections = [params.data.model_dump(mode="json"), params.eval.model_dump(mode="json")]
    return json.dumps([reads, sections, params.buffer.exclude_special_tokens])


def evaluate_dictionary(
    lm: LanguageModel,
    hook: HookPoint,
    sae,
    params: Params,
    size: EvalSize | None = None,
    progress: Progress = no_progress,
    target_hook: HookPoint | None = None,
) -> dict:
    """``evaluate_dictionaries`` for one dictionary."""
    return evaluate_dictionaries(lm, hook, [sae], params, size, progress, target_hook)[0]


def evaluate_dictionaries(
    lm: LanguageModel,
    hook: HookPoint,
    saes: Sequence,
    params: Params,
    size: EvalSize | None = None,
    progress: Progress = no_progress,
    target_hook: HookPoint | None = None,
) -> list[dict]:
    """Held-out evaluation of each of ``saes`` at ``hook`` (``size`` defaults to ``post_train_size(params)``):
    one pass for reconstruction, sparsity, LM loss and KL, shared by all of them (``held_out_passes``); each
    one's decoder and encoder redundancy; absorption if asked. A transcoder (``target_hook``) is measured
    against, and spliced in at, its target hook.

    Each result's ``tokens`` and ``lm_loss_tokens`` say how much was read: fewer than asked when the held-out
    text runs out (the caller says so); no held-out text at all is a ``UserError``. Its ``seconds`` give the
    shared pass's time and its own similarity and absorption times.
    """
    size = size or post_train_size(params)
    per_window = params.data.context_size - int(params.data.prepend_bos)
    lm_loss_windows = -(-size.lm_loss_tokens // per_window)
    num_windows = max(-(-size.tokens // per_window), lm_loss_windows)
    windows = islice(held_out_windows(params.data, lm.tokenizer), num_windows)
    excluded = (
        special_token_ids(lm.tokenizer) if params.buffer.exclude_special_tokens else torch.empty(0, dtype=torch.long)
    )
    started = time.perf_counter()
    with progress("held-out pass (reconstruction, LM loss, KL)", num_windows * per_window) as bar:
        try:
            results = held_out_passes(
                lm,
                hook,
                saes,
                windows,
                batch_size=params.eval.batch_size,
                excluded_ids=excluded,
                lm_loss_windows=lm_loss_windows,
                on_batch=bar.update,
                target_hook=target_hook,
            )
        except ValueError:
            raise UserError(
                f"data: the held-out text ({params.data.source} {params.data.path}, every "
                f"{params.data.held_out_every}th window of {params.data.context_size} tokens) has no text tokens "
                "to evaluate on; give more text or a smaller data.held_out_every"
            ) from None
    pass_seconds = time.perf_counter() - started
    for sae, result in zip(saes, results, strict=True):
        result["tokens_asked"], result["lm_loss_tokens_asked"] = size.tokens, size.lm_loss_tokens
        seconds = {"held_out_pass": pass_seconds}
        started = time.perf_counter()
        with progress("decoder and encoder similarity", 2) as bar:
            result["average_max_decoder_cosine_sim"] = mean_max_cosine_similarity(sae.W_dec)
            bar.update(1)
            result["average_max_encoder_cosine_sim"] = mean_max_cosine_similarity(sae.W_enc)
            bar.update(1)
        seconds["similarity"] = time.perf_counter() - started
        if size.absorption_words:
            started = time.perf_counter()
            result["absorption"] = absorption(
                lm, hook, sae, size.absorption_words, params.eval.batch_size * 8, progress
            )
            result["absorption_rate"] = result["absorption"]["absorption_rate"]
            result["mean_num_split_features"] = result["absorption"]["mean_num_split_features"]
            seconds["absorption"] = time.perf_counter() - started
        result["seconds"] = seconds
    return results


def absorption(lm: LanguageModel, hook: HookPoint, sae, max_words: int, batch_size: int, progress: Progress) -> dict:
    """First-letter absorption (absorption.py) on up to ``max_words`` words of the model's vocabulary; NaN
    rates when the vocabulary has under 100 such words (a toy tokenizer), too few to train the probe."""
    word_ids, words = vocabulary_words(lm.tokenizer, max_words)
    if len(words) < 100:
        return {"absorption_rate": nan, "mean_num_split_features": nan, "absorption_words": len(words)}
    with progress("absorption: word activations", len(word_ids)) as bar:
        acts_ND = word_activations(lm, hook, word_ids, batch_size, bar.update)

    def encode(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = [sae.encode(x_BD.to(sae.W_dec.device, sae.W_dec.dtype)) for x_BD in x_ND.split(1024)]
        return torch.cat([c.values.cpu() for c in codes]), torch.cat([c.indices.cpu() for c in codes])

    with progress("absorption: probes per letter", 26) as bar:
        result = first_letter_absorption(acts_ND, letter_labels(words), encode, sae.W_dec, on_class=bar.update)
    result["per_class"] = {ascii_lowercase[letter]: record for letter, record in result["per_class"].items()}
    return result
