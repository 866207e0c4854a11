"""Typed, validated run configuration (YAML <-> objects).

A config file has the sections below; every key is optional and defaults to the demo
settings. Unknown keys, wrong types and out-of-range values are errors that name the key,
the value and what would be valid (:class:`ConfigError`).

```yaml
model: demo                 # "demo" (the bundled model) or a Hugging Face model directory
dtype: float32              # float32 | bfloat16
data:
  calibration: demo         # "demo", a text file, a directory, a glob or a .jsonl file
  heldout: null             # same forms; null: the demo held-out split, or the end of
                            # the calibration corpus for other sources
  tokenizer: bytes          # "bytes" or a tokenizer.json path (default: the model's own)
  text_field: text          # for .jsonl sources
  pattern: "*.txt"          # for directory sources
  seq_len: 128
  n_calibration_seqs: null  # null: 64 for causal LMs, 256 for encoders (DataConfig)
  n_heldout_seqs: 64
  seed: 0
  n_validation_seqs: null   # calibration-source rows the search never scores (0: off;
                            # null: up to 16, fewer where the corpus has fewer free):
                            # they pick EvoPress's final allocation and are reported
supernet:
  pruner: sparsegpt         # magnitude | wanda | sparsegpt
  structure: unstructured   # unstructured | nm | heads_neurons
  head_granularity: kv_group  # heads_neurons: remove kv groups | query_head (one query
                            # head at a time; k/v go with a kv head's last query head)
  center: 0.6               # centre sparsity of the level grid (usually the target)
  steps_each_side: 4        # levels on each side of the centre (9 levels in all)
  step_fraction: 0.05       # one step = this fraction of the mean layer size
  nm_patterns: ["2:4", "4:8"]
  input_mode: dense         # dense | expected | centre
  storage_dtype: auto       # auto (the model's dtype) | float32 | bfloat16: dense variants
  tie_experts: false        # MoE models: one unit per block and projection over all experts
  expert_removal: false     # MoE models: one unit per expert, whose last level removes it
                            # (router logit masked; the top_k most routed experts of a
                            # block never are)
  prune_router: false       # MoE models: each block's router linear is a unit too
search:
  strategy: evopress        # evopress | tyr | dp | knapsack | uniform | owl | ...
  budget_kind: params       # params | flops | latency | sublayers (depth supernets: a
                            # number of sublayers dropped, EvoPress's "drop k of L")
                            # | bits | bytes (quantized supernets: bits / bytes of the
                            # 16-bit model removed; `--budget bits --target 3` = 3 bits)
  target: 0.6               # fraction of the dense cost removed (sublayers: k / L, at
                            # least floor(target * L) of the L sublayers dropped)
  tie_blocks: false         # depth "drop" supernets: search whole blocks (a block's
                            # attention and MLP dropped together)
  latency_table: null       # file, for budget_kind latency
  min_sparsity: 0.0
  max_sparsity: 1.0
  seed: 0
  settings: {}              # strategy hyperparameters (see `allocsearch search --help`)
evaluator:
  metric: kl                # causal LMs: kl | topk_kl | nll; encoders: embedding_cosine
                            # (mean-pooled sentence embeddings) | hidden_nmse
  topk: null
  execution: auto           # auto | resident | streaming (see `allocsearch plan`)
  micro_batch_tokens: 8192  # at most this many tokens (whole sequences, at least one) per
                            # scoring call: bounds activation memory; scores do not change
  stream_unit: auto         # streaming: block (a block's variants on the device at a time)
                            # | unit (one unit group's: q, k, v, o, gate, up, down, one
                            # expert) | auto (block when the plan fits it, else unit)
backend:
  kind: ray                 # ray (default) | local (in process, no Ray: tests, debugging)
  address: null             # an existing Ray cluster (or RAY_ADDRESS); null: a local Ray
                            # instance started and stopped by allocsearch
  workers: auto             # Ray actors: an integer >= 1, or auto (one per CPU core this
                            # process may use; on a cluster, one per CPU, or one per GPU
                            # when it has GPUs)
  replace_timeout_s: 60     # seconds a dead actor's replacement may take to be placed and
                            # started before its slot is given up (the search goes on with
                            # fewer actors)
```
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from allocsearch.search.registry import STRATEGY_NAMES
from allocsearch.supernet.depth import DEPTH_MODES

PRUNERS = ("magnitude", "wanda", "sparsegpt")
STRUCTURES = ("unstructured", "nm", "heads_neurons")
HEAD_GRANULARITIES = ("kv_group", "query_head")
INPUT_MODES = ("dense", "expected", "centre")
STRATEGIES = STRATEGY_NAMES  # the strategy registry's names
BUDGET_KINDS = ("params", "flops", "latency", "sublayers", "bits", "bytes")
METRICS = ("kl", "topk_kl", "nll", "embedding_cosine", "hidden_nmse")
ENCODER_METRICS = ("embedding_cosine", "hidden_nmse")
BACKENDS = ("local", "ray")
EXECUTIONS = ("auto", "resident", "streaming")
STREAM_UNITS = ("auto", "block", "unit")
DTYPES = ("float32", "bfloat16")
STORAGE_DTYPES = ("auto", *DTYPES)
AUTO_WORKERS = "auto"
# Calibration rows when data.n_calibration_seqs is unset (None). Encoders get more: on
# all-MiniLM-L6-v2 (docs/RESULTS.md, "MiniLM: held-out quality per strategy") 64 rows let
# the searches fit their calibration rows (their calibration and held-out rankings of
# the strategies differed); 256 made the two rankings agree.
CALIBRATION_SEQS = 64
ENCODER_CALIBRATION_SEQS = 256


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and what is valid."""


def _choice(section: str, key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{section}.{key} = {value!r} is not valid; choose one of {list(valid)}")


def _range(section: str, key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{section}.{key} = {value!r} is outside [{lo}, {hi}]")


@dataclass(frozen=True)
class DataConfig:
    calibration: str = "demo"
    heldout: str | None = None
    tokenizer: str | None = None
    text_field: str = "text"
    pattern: str = "*.txt"
    seq_len: int = 128
    # None: CALIBRATION_SEQS for causal LMs, ENCODER_CALIBRATION_SEQS for encoders
    # (resolved when the model is known: with_model_defaults)
    n_calibration_seqs: int | None = None
    n_heldout_seqs: int = 64
    seed: int = 0
    # calibration-source rows the search never scores: they pick EvoPress's final
    # allocation and give every strategy a validation fitness (0: off; None: up to 16,
    # fewer where the corpus has fewer free sequences: data/validation.validation_request)
    n_validation_seqs: int | None = None

    def validate(self) -> None:
        for key in ("seq_len", "n_calibration_seqs", "n_heldout_seqs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} = {value} must be >= 1")
        if self.n_validation_seqs is not None and self.n_validation_seqs < 0:
            raise ConfigError(
                f"data.n_validation_seqs = {self.n_validation_seqs} must be >= 0 (0 turns "
                "the validation split off)"
            )

    def calibration_seqs(self, *, encoder: bool) -> int:
        """Calibration rows for a causal LM or an encoder: the configured number, else
        :data:`CALIBRATION_SEQS` or :data:`ENCODER_CALIBRATION_SEQS`."""
        if self.n_calibration_seqs is not None:
            return self.n_calibration_seqs
        return ENCODER_CALIBRATION_SEQS if encoder else CALIBRATION_SEQS


@dataclass(frozen=True)
class SupernetConfig:
    pruner: str = "sparsegpt"
    structure: str = "unstructured"
    head_granularity: str = "kv_group"
    center: float = 0.6
    steps_each_side: int = 4
    step_fraction: float = 0.05
    nm_patterns: tuple[str, ...] = ("2:4", "4:8")
    input_mode: str = "dense"
    storage_dtype: str = "auto"
    # Mixture-of-experts models: one unit per (block, projection) over all experts.
    tie_experts: bool = False
    # Mixture-of-experts models: a removed level per expert (supernet.experts).
    expert_removal: bool = False
    # Mixture-of-experts models: each block's router is a unit.
    prune_router: bool = False
    depth: str = "none"  # supernet.depth.DEPTH_MODES: a "dropped" level per sublayer

    def validate(self) -> None:
        for key in ("tie_experts", "expert_removal", "prune_router"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"supernet.{key} = {getattr(self, key)!r} must be true or false")
        if self.expert_removal and self.tie_experts:
            raise ConfigError(
                "supernet.expert_removal and supernet.tie_experts exclude each other (tied "
                "units give all experts of a block one level); set one of them"
            )
        if self.expert_removal and self.structure != "unstructured":
            raise ConfigError(
                f"supernet.expert_removal needs supernet.structure 'unstructured', not "
                f"{self.structure!r}"
            )
        _choice("supernet", "pruner", self.pruner, PRUNERS)
        _choice("supernet", "structure", self.structure, STRUCTURES)
        _choice("supernet", "head_granularity", self.head_granularity, HEAD_GRANULARITIES)
        _choice("supernet", "input_mode", self.input_mode, INPUT_MODES)
        _choice("supernet", "storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _choice("supernet", "depth", self.depth, DEPTH_MODES)
        if self.depth != "none" and self.structure != "heads_neurons":
            raise ConfigError(
                f"supernet.depth = {self.depth!r} drops attention / MLP sublayers, the units "
                f"of structure 'heads_neurons'; supernet.structure is {self.structure!r}"
            )
        _range("supernet", "center", self.center, 0.0, 1.0)
        _range("supernet", "step_fraction", self.step_fraction, 1e-6, 1.0)
        if self.steps_each_side < 1:
            raise ConfigError(f"supernet.steps_each_side = {self.steps_each_side} must be >= 1")
        for p in self.nm_patterns:
            parts = str(p).split(":")
            if (
                len(parts) != 2
                or not all(x.isdigit() for x in parts)
                or int(parts[0]) >= int(parts[1])
            ):
                raise ConfigError(
                    f"supernet.nm_patterns entry {p!r} is not 'N:M' with 0 <= N < M (N zeros)"
                )


@dataclass(frozen=True)
class SearchConfig:
    strategy: str = "dp+evopress"  # the best measured on held-out data (README)
    budget_kind: str = "params"
    target: float = 0.6
    latency_table: str | None = None
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    tie_blocks: bool = False  # supernet.depth.TiedBlocks: whole blocks as units

    def validate(self) -> None:
        _choice("search", "strategy", self.strategy, STRATEGIES)
        if not isinstance(self.tie_blocks, bool):
            raise ConfigError(f"search.tie_blocks = {self.tie_blocks!r} must be true or false")
        _choice("search", "budget_kind", self.budget_kind, BUDGET_KINDS)
        _range("search", "target", self.target, 0.0, 1.0)
        _range("search", "min_sparsity", self.min_sparsity, 0.0, 1.0)
        _range("search", "max_sparsity", self.max_sparsity, 0.0, 1.0)
        if self.min_sparsity > self.max_sparsity:
            raise ConfigError(
                f"search.min_sparsity = {self.min_sparsity} is above "
                f"search.max_sparsity = {self.max_sparsity}"
            )
        if self.budget_kind == "latency" and not self.latency_table:
            raise ConfigError("search.budget_kind = 'latency' needs search.latency_table (a file)")


@dataclass(frozen=True)
class EvaluatorConfig:
    """How candidates are scored.

    ``execution``: ``"resident"`` (every variant on the device: fastest, for what fits),
    ``"streaming"`` (block by block from the memory-mapped store: for supernets larger
    than the device) or ``"auto"`` (chosen by :func:`allocsearch.pipeline.choose_execution`).
    ``micro_batch_tokens``: tokens (whole sequences, at least one) per scoring call, both
    modes; smaller uses less activation memory, the scores are the same.
    ``stream_unit``: what streaming holds on the device at a time: ``"block"`` (a block's
    variants), ``"unit"`` (one unit group's) or ``"auto"`` (block when the memory plan
    fits it, else unit); the scores are the same.
    """

    metric: str = "kl"
    topk: int | None = None
    execution: str = "auto"
    micro_batch_tokens: int = 8192
    stream_unit: str = "auto"

    def validate(self) -> None:
        _choice("evaluator", "metric", self.metric, METRICS)
        _choice("evaluator", "execution", self.execution, EXECUTIONS)
        _choice("evaluator", "stream_unit", self.stream_unit, STREAM_UNITS)
        if isinstance(self.micro_batch_tokens, bool) or self.micro_batch_tokens < 1:
            raise ConfigError(
                f"evaluator.micro_batch_tokens = {self.micro_batch_tokens!r} must be an "
                "integer >= 1 (tokens per scoring call; whole sequences, at least one)"
            )
        if self.metric == "topk_kl" and (self.topk is None or self.topk < 1):
            raise ConfigError(f"evaluator.topk = {self.topk!r}: topk_kl needs a topk >= 1")


@dataclass(frozen=True)
class BackendConfig:
    """Where candidates are scored and supernet layers pruned.

    ``kind``: ``"ray"`` (default: Ray actors, on a local Ray instance started by allocsearch
    or on the cluster at ``address`` / ``RAY_ADDRESS``) or ``"local"`` (in this process, no
    Ray). ``workers``: number of Ray actors, an integer >= 1 or ``"auto"`` (resolved by
    :func:`allocsearch.distributed.ray_backend.auto_worker_plan` once Ray is up).
    ``replace_timeout_s``: seconds a dead actor's replacement may take to be placed and
    started; past it the slot is given up and the others go on.
    """

    kind: str = "ray"
    address: str | None = None
    workers: int | str = "auto"
    replace_timeout_s: float = 60.0

    def validate(self) -> None:
        _choice("backend", "kind", self.kind, BACKENDS)
        if not self.replace_timeout_s > 0:
            raise ConfigError(
                f"backend.replace_timeout_s = {self.replace_timeout_s!r} must be > 0 (seconds "
                "a dead actor's replacement may take to be placed and started)"
            )
        if self.workers != AUTO_WORKERS and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1
        ):
            raise ConfigError(
                f"backend.workers = {self.workers!r} is not valid; use an integer >= 1 or "
                f"{AUTO_WORKERS!r}"
            )


@dataclass(frozen=True)
class RunConfig:
    model: str = "demo"
    dtype: str = "float32"
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)

    def validate(self) -> RunConfig:
        _choice("", "dtype", self.dtype, DTYPES)
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'config'}; valid keys: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{path} must not be null")
    if set(get_args(hint)) == {int, str}:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{path} = {value!r} must be an integer or a string")
        return value
    if hint is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} must be true or false")
        return value
    if hint is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} = {value!r} must be a number")
        return float(value)
    if text.startswith("tuple"):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} = {value!r} must be a list")
        return tuple(str(v) for v in value)
    if text.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r} must be a mapping")
        return dict(value)
    if not isinstance(value, str):
        raise ConfigError(f"{path} = {value!r} must be a string")
    return value


def with_model_defaults(cfg: RunConfig, *, encoder: bool) -> RunConfig:
    """``cfg`` with the defaults that depend on the model's kind filled in (today
    ``data.n_calibration_seqs``: :meth:`DataConfig.calibration_seqs`)."""
    n = cfg.data.calibration_seqs(encoder=encoder)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_calibration_seqs=n))


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a parsed YAML mapping."""
    return _build(RunConfig, data or {}, "").validate()


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at} ({problem})") from None
    return config_from_dict(data)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a config (round-trips through :func:`config_from_dict`)."""
    data = cfg.to_dict()
    data["supernet"]["nm_patterns"] = list(data["supernet"]["nm_patterns"])
    return yaml.safe_dump(data, sort_keys=False)
