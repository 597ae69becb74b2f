"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507),
run as SAEBench's absorption evaluation runs it, offline on words from the model's own vocabulary.

1. Words: vocabulary tokens that are a space and an alphabetic ASCII word (" lion"); each is read at its own
   position after a short fixed in-context prefix ("... has the first letter: ..."), all prompts one length.
2. A logistic-regression probe (26 classes) is trained on the activations at the hook; its row for letter L,
   normalised, is the probe direction of "starts with L".
3. The SAE's main latents for L come from k-sparse probing: latents ranked by mean activation on L-words minus
   on the others, a 1-D probe fitted on the top k for k = 1, 2, ...; the main latents are the top k at the first
   k where adding one more latent raises F1 by less than ``f1_jump`` (SAEBench: tau_fs = 0.03).
4. A test word of letter L that the probe classifies correctly is *fully absorbed* (SAEBench's
   ``FeatureAbsorptionCalculator._is_full_absorption``) when none of L's main latents fire on it, and the active
   latent with the largest probe projection ``value * cos(W_dec[j], probe)`` has cosine at least ``cos_min``
   with the probe direction (SAEBench: 0.025) and a projection at least ``min_share`` (SAEBench's
   ``probe_projection_proportion_threshold``, 0.4) of the activation's own projection ``x . probe`` (which
   must be positive): the letter is still in the activation, the letter's latents are silent, and one other
   latent carries the direction instead.

Shape letters: N words, D input width, C classes, P probe inputs, F latents, K active latents per row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from string import ascii_lowercase

import torch
import torch.nn.functional as F
from torch import Tensor

from dictlearn.lm.models import HookPoint, LanguageModel, capture_activations

ICL_PREFIX = " tartan has the first letter: T\n mirror has the first letter: M\n"


def vocabulary_words(tokenizer, max_words: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """Up to ``max_words`` token ids that decode to a space and a lowercase-able ASCII word of 2+ letters,
    sampled evenly (seeded) from the vocabulary, and the words without the space."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids])
    found = [
        (i, t[1:])
        for i, t in zip(ids, texts)
        if t.startswith(" ") and len(t) > 2 and t[1:].isascii() and t[1:].isalpha()
    ]
    if len(found) > max_words:
        keep = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))[:max_words]
        found = [found[i] for i in sorted(keep.tolist())]
    return [i for i, _ in found], [w for _, w in found]


@torch.no_grad()
def word_activations(
    lm: LanguageModel, hook: HookPoint, word_ids: list[int], batch_size: int, on_batch: Callable[[int], None]
) -> Tensor:
    """(N, D) activations at ``hook`` at each word, read after the fixed in-context prefix."""
    tokenizer = lm.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [bos, *tokenizer(ICL_PREFIX, add_special_tokens=False)["input_ids"]]
    rows = []
    for start in range(0, len(word_ids), batch_size):
        batch = word_ids[start : start + batch_size]
        input_ids = torch.tensor([[*prefix, w] for w in batch], dtype=torch.long, device=lm.device)
        rows.append(capture_activations(lm.model, hook, input_ids)[:, -1].float().cpu())
        on_batch(len(batch))
    return torch.cat(rows)


def fit_logistic(x_NP: Tensor, y_N: Tensor, num_classes: int, *, balanced: bool = False, l2: float = 1e-4):
    """Multinomial logistic regression (L-BFGS, full batch, L2 penalty ``l2``): weights (C, P) and bias (C,).

    ``balanced`` weighs each class by the inverse of its frequency (scikit-learn's class_weight='balanced').
    """
    weight_C = None
    if balanced:
        counts_C = torch.bincount(y_N, minlength=num_classes).double().clamp_min(1)
        weight_C = (len(y_N) / (num_classes * counts_C)).float()
    W_CP = torch.zeros(num_classes, x_NP.shape[1], requires_grad=True)
    b_C = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W_CP, b_C], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x_NP @ W_CP.T + b_C, y_N, weight=weight_C) + l2 * W_CP.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return W_CP.detach(), b_C.detach()


def _f1(predicted_N: Tensor, truth_N: Tensor) -> float:
    true_positives = float((predicted_N & truth_N).sum())
    return 2 * true_positives / max(float(predicted_N.sum() + truth_N.sum()), 1.0)


def _dense_columns(values_NK: Tensor, indices_NK: Tensor, latents: Tensor) -> Tensor:
    """(N, len(latents)) values of the given latents, 0 where they do not fire."""
    return ((indices_NK[..., None] == latents).float() * values_NK[..., None]).sum(1)


def main_latents(
    values_NK: Tensor,
    indices_NK: Tensor,
    positive_N: Tensor,
    train_N: Tensor,
    num_latents: int,
    *,
    max_k: int,
    f1_jump: float,
) -> list[int]:
    """The SAE's main latents for one class by k-sparse probing (module docstring, step 3)."""
    fired = values_NK[train_N].float()
    labels = positive_N[train_N][:, None].expand_as(fired)
    sum_pos_F = torch.zeros(num_latents).index_add_(0, indices_NK[train_N][labels], fired[labels])
    sum_all_F = torch.zeros(num_latents).index_add_(0, indices_NK[train_N].flatten(), fired.flatten())
    n_pos = max(int(positive_N[train_N].sum()), 1)
    n_neg = max(int(train_N.sum()) - n_pos, 1)
    difference_F = sum_pos_F / n_pos - (sum_all_F - sum_pos_F) / n_neg
    candidates = difference_F.topk(min(max_k, num_latents)).indices
    features_NP = _dense_columns(values_NK.float(), indices_NK, candidates)
    scale = features_NP[train_N].abs().amax(0).clamp_min(1e-12)
    features_NP = features_NP / scale
    test_N = ~train_N
    scores = []
    for k in range(1, len(candidates) + 1):
        W, b = fit_logistic(features_NP[train_N, :k], positive_N[train_N].long(), 2, balanced=True)
        predicted = (features_NP[test_N, :k] @ W.T + b).argmax(1) == 1
        scores.append(_f1(predicted, positive_N[test_N]))
        if k > 1 and scores[-1] - scores[-2] < f1_jump:
            return candidates[: k - 1].tolist()
    return candidates.tolist()


@torch.no_grad()
def first_letter_absorption(
    acts_ND: Tensor,
    letters_N: Tensor,
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    W_dec_FD: Tensor,
    *,
    num_classes: int = 26,
    test_fraction: float = 0.3,
    max_k: int = 10,
    f1_jump: float = 0.03,
    cos_min: float = 0.025,
    min_share: float = 0.4,
    min_words: int = 10,
    seed: int = 0,
    on_class: Callable[[int], None] = lambda _n: None,
) -> dict:
    """Absorption for each class (letter) with at least ``min_words`` words, from activations and labels.

    ``encode(x_BD)`` returns the SAE's (values_BK, indices_BK). Returns ``absorption_rate`` (mean over
    classes of absorbed / probe-correct test words, SAEBench's full-absorption rate), ``mean_num_split_features``
    (mean number of main latents, SAEBench's name), ``probe_accuracy`` on the test words, and ``per_class``:
    for each class its main latents, counts, and the absorbing latents with how often each absorbed.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(acts_ND), generator=generator)
    train_N = torch.ones(len(acts_ND), dtype=torch.bool)
    train_N[order[: int(test_fraction * len(acts_ND))]] = False
    test_N = ~train_N
    scale = acts_ND.norm(dim=1).mean().clamp_min(1e-12)  # only conditions the fit; directions are unchanged
    W_probe_CD, b_probe_C = fit_logistic(acts_ND[train_N] / scale, letters_N[train_N], num_classes)
    predicted_N = (acts_ND / scale @ W_probe_CD.T + b_probe_C).argmax(1)
    values_NK, indices_NK = encode(acts_ND)
    values_NK = values_NK.float().cpu()
    indices_NK = indices_NK.cpu()
    unit_dec_FD = F.normalize(W_dec_FD.float().cpu(), dim=1)
    per_class, rates, splits = {}, [], []
    counts = torch.bincount(letters_N, minlength=num_classes)
    for letter in range(num_classes):
        if counts[letter] < min_words:
            continue
        positive_N = letters_N == letter
        main = main_latents(values_NK, indices_NK, positive_N, train_N, len(W_dec_FD), max_k=max_k, f1_jump=f1_jump)
        probe_D = F.normalize(W_probe_CD[letter], dim=0)
        cos_F = unit_dec_FD @ probe_D
        cases = torch.nonzero(test_N & positive_N & (predicted_N == letter)).flatten()
        projection_N = acts_ND.float().cpu() @ probe_D
        absorbing, false_negatives = Counter(), 0
        for row in cases.tolist():
            active = values_NK[row] != 0
            latents, values = indices_NK[row][active], values_NK[row][active]
            if any(latent in main for latent in latents.tolist()):
                continue
            false_negatives += 1
            if not len(latents) or projection_N[row] <= 0:
                continue
            projections = values * cos_F[latents]
            best = int(projections.argmax())
            latent = int(latents[best])
            if cos_F[latent] >= cos_min and float(projections[best]) >= min_share * float(projection_N[row]):
                absorbing[latent] += 1
        rate = sum(absorbing.values()) / len(cases) if len(cases) else 0.0
        rates.append(rate)
        splits.append(len(main))
        per_class[letter] = {
            "main_latents": main,
            "probe_correct_test_words": len(cases),
            "false_negatives": false_negatives,
            "absorbed": sum(absorbing.values()),
            "absorption_rate": rate,
            "absorbing_latents": dict(absorbing.most_common()),
        }
        on_class(1)
    return {
        "absorption_rate": sum(rates) / len(rates) if rates else float("nan"),
        "mean_num_split_features": sum(splits) / len(splits) if splits else float("nan"),
        "probe_accuracy": float((predicted_N[test_N] == letters_N[test_N]).double().mean()),
        "absorption_words": len(acts_ND),
        "per_class": per_class,
    }


def letter_labels(words: list[str]) -> Tensor:
    """(N,) int64 index of each word's first letter in a..z."""
    return torch.tensor([ascii_lowercase.index(w[0].lower()) for w in words], dtype=torch.long)
