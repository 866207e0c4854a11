"""The command line's options, declared once: an alias per option, and option groups.

An alias (``ModelOpt``) is one option's type, flag and help; a command lists it as
``model: ModelOpt = None``. A group (:class:`DataOpts`, :class:`BackendOpts`) is several
options that travel together: a command's parameter ``data: DataOpts = DataOpts()``
stands for the group's options at that place in its ``--help``, and the command receives
them as one value (:func:`with_options`). Adding an option: its alias here, then its name
in the commands (or the group) that take it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "AddressOpt",
    "BackendOpt",
    "BackendOpts",
    "BitsOpt",
    "BudgetOpt",
    "CalibrationOpt",
    "CalibrationSeqsOpt",
    "CenterOpt",
    "ConfigOpt",
    "DataOpts",
    "DepthOpt",
    "ExpertRemovalOpt",
    "GenerationsOpt",
    "GroupSizeOpt",
    "HeldoutOpt",
    "HeldoutSeqsOpt",
    "InputModeOpt",
    "MetricOpt",
    "MicroBatchOpt",
    "ModelOpt",
    "OptionGroup",
    "OverwriteOpt",
    "ProgressOpt",
    "PruneRouterOpt",
    "PrunerOpt",
    "QuantizeOpts",
    "QuantizerOpt",
    "ReplaceTimeoutOpt",
    "ScoringOpts",
    "SearchTargetOpt",
    "SeqLenOpt",
    "StepsEachSideOpt",
    "StorageDtypeOpt",
    "StructureOpt",
    "SymmetricOpt",
    "TargetOpt",
    "TieBlocksOpt",
    "WorkersOpt",
    "backend_overrides",
    "data_overrides",
    "heldout_overrides",
    "with_options",
]

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML run config (see configs/); default: the demo settings."
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace existing outputs instead of refusing (default: refuse existing outputs).",
    ),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        help="ray (Ray actors) | local (in process, no Ray) (default: the config's "
        "backend.kind, else ray)."
    ),
]
WorkersOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray actors: an integer, or auto (one per CPU core; on a cluster with GPUs, "
        "one per GPU) (default: the config's backend.workers, else auto)."
    ),
]
StorageDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Dense variants' storage: auto (the model's dtype) | float32 | bfloat16 "
        "(default: the config's supernet.storage_dtype, else auto)."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Model directory or 'demo'; overrides the config's `model` (default: the config's "
        "model, else demo)."
    ),
]
CalibrationOpt = Annotated[
    str | None,
    typer.Option(
        help="Calibration text: demo, a text file, a directory, a glob or a .jsonl file "
        "(default: the config's data.calibration, else demo)."
    ),
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        help="Tokens per calibration and held-out sequence (default: the config's "
        "data.seq_len, else 128)."
    ),
]
CalibrationSeqsOpt = Annotated[
    int | None,
    typer.Option(
        help="Calibration sequences; calibration tokens = this x --seq-len (default: the "
        "config's data.n_calibration_seqs, else 64; 256 for encoders)."
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        help="Fitness metric: causal LMs kl | topk_kl | nll; encoders embedding_cosine | "
        "hidden_nmse (default: the config's evaluator.metric, else kl)."
    ),
]
HeldoutOpt = Annotated[
    str | None,
    typer.Option(
        help="Held-out text (forms as --calibration) (default: the config's data.heldout, "
        "else the demo's held-out split, or the last --heldout-seqs sequences of the "
        "calibration text)."
    ),
]
HeldoutSeqsOpt = Annotated[
    int | None,
    typer.Option(help="Held-out sequences (default: the config's data.n_heldout_seqs, else 64)."),
]
GenerationsOpt = Annotated[
    int | None,
    typer.Option(
        help="EvoPress generations (evopress, dp+evopress and tyr's inner search) (default: "
        "the config's search.settings, else 30)."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="Existing Ray cluster (or RAY_ADDRESS); default: a local Ray instance."),
]
MicroBatchOpt = Annotated[
    int | None,
    typer.Option(
        help="Tokens per scoring call (whole sequences, at least one): smaller uses less "
        "activation memory, same scores (default: the config's evaluator.micro_batch_tokens, "
        "else 8192)."
    ),
]
StreamUnitOpt = Annotated[
    str | None,
    typer.Option(
        help="Streaming: block (a block's variants on the device at a time) | unit (one unit "
        "group's: q, k, v, o, gate, up, down, one expert) | auto (block when the memory plan "
        "fits it, else unit); same scores (default: the config's evaluator.stream_unit)."
    ),
]
ReplaceTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a dead Ray actor's replacement may take to be placed and started before "
        "its slot is given up (default: the config's backend.replace_timeout_s, else 60)."
    ),
]
StepsEachSideOpt = Annotated[
    int | None,
    typer.Option(
        help="Levels on each side of the grid's centre (2 x this + 1 levels) (default: the "
        "config's supernet.steps_each_side, else 4)."
    ),
]

TargetOpt = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the budget to remove (default: the config's search.target if it "
        "sets one, else the supernet's centre: what a uniform allocation on it removes)."
    ),
]

SearchTargetOpt = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the budget to remove; with --budget sublayers, the number of "
        "sublayers to drop (a whole number; a value below 1 is a fraction of them, as "
        "EvoPress's --sparsity) (default: the config's search.target if it sets one, else "
        "the supernet's centre: what a uniform allocation on it removes)."
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="params | flops | latency (a measured table: search.latency_table) | "
        "sublayers (depth supernets: drop --target of the attention / MLP sublayers, "
        "EvoPress's 'drop k of L') | bits (--target: average bits per weight, scales and "
        "zero points counted) | bytes (prunable bytes; --target: fraction of the 16-bit "
        "bytes removed) (default: the config's search.budget_kind, else params).",
    ),
]
TieBlocksOpt = Annotated[
    bool | None,
    typer.Option(
        "--tie-blocks/--no-tie-blocks",
        help="Search whole blocks (attention and MLP dropped together) on a depth 'drop' "
        "supernet; the recipe lists both sublayers of each block (default: the config's "
        "search.tie_blocks, else off).",
    ),
]


# `build`: the supernet
PrunerOpt = Annotated[
    str | None,
    typer.Option(
        help="magnitude | wanda | sparsegpt (default: the config's supernet.pruner, else "
        "sparsegpt)."
    ),
]
StructureOpt = Annotated[
    str | None,
    typer.Option(
        help="unstructured | nm | heads_neurons (default: the config's supernet.structure, "
        "else unstructured)."
    ),
]
CenterOpt = Annotated[
    float | None,
    typer.Option(
        help="Centre sparsity of the grid (default: the config's supernet.center, else 0.6)."
    ),
]
InputModeOpt = Annotated[
    str | None,
    typer.Option(
        help="dense | expected | centre (default: the config's supernet.input_mode, else dense)."
    ),
]
DepthOpt = Annotated[
    str | None,
    typer.Option(
        help="none | sublayers (levels + dropped) | drop (dense or dropped) (default: the "
        "config's supernet.depth, else none)."
    ),
]
ExpertRemovalOpt = Annotated[
    bool | None,
    typer.Option(
        "--expert-removal/--no-expert-removal",
        help="Mixture-of-experts models: one unit per expert (gate, up, down) with a last "
        "'removed' level (router logit masked; the top_k most routed experts of each "
        "block keep theirs) (default: the config's supernet.expert_removal, else off).",
    ),
]
PruneRouterOpt = Annotated[
    bool | None,
    typer.Option(
        "--prune-router/--no-prune-router",
        help="Mixture-of-experts models: each block's router linear is a unit too "
        "(default: the config's supernet.prune_router, else off).",
    ),
]

# `build --quantizer`
QuantizerOpt = Annotated[
    str | None,
    typer.Option(
        help="rtn | gptq: quantized levels (--bits) instead of pruned ones, in process, "
        "dequantized float32 weights in the store; the spec's level fraction is "
        "1 - bits per weight / 16, so a params budget is an average-bits budget "
        "(default: none, prune)."
    ),
]
BitsOpt = Annotated[
    str, typer.Option(help="Bitwidths of a quantized supernet, comma-separated (2..8).")
]
GroupSizeOpt = Annotated[
    int, typer.Option(help="Input columns per quantization scale (--quantizer).")
]
SymmetricOpt = Annotated[
    bool,
    typer.Option(
        "--symmetric/--asymmetric", help="Scale only, or scale and zero point (--quantizer)."
    ),
]


# --------------------------------------------------------------------------- groups


class OptionGroup:
    """Options that travel together; a dataclass whose fields are option aliases."""


@dataclasses.dataclass(frozen=True)
class DataOpts(OptionGroup):
    """Calibration and held-out data: --calibration ... --heldout-seqs."""

    calibration: CalibrationOpt = None
    seq_len: SeqLenOpt = None
    calibration_seqs: CalibrationSeqsOpt = None
    heldout: HeldoutOpt = None
    heldout_seqs: HeldoutSeqsOpt = None

    def overrides(self, metric: str | None = None) -> dict[str, Any]:
        """Config overrides of the data options (and ``--metric``)."""
        return {
            **data_overrides(self.calibration, self.seq_len, self.calibration_seqs),
            **heldout_overrides(self.heldout, self.heldout_seqs, metric),
        }


@dataclasses.dataclass(frozen=True)
class BackendOpts(OptionGroup):
    """Where scoring and building run: --backend, --workers, --address, --replace-timeout."""

    backend: BackendOpt = None
    workers: WorkersOpt = None
    address: AddressOpt = None
    replace_timeout: ReplaceTimeoutOpt = None

    def overrides(self) -> dict[str, Any]:
        """Config overrides of the backend options (``--workers`` parsed: an integer or a
        word, which the config validates; the address defaults to ``RAY_ADDRESS``)."""
        return backend_overrides(self.backend, self.workers, self.address, self.replace_timeout)


@dataclasses.dataclass(frozen=True)
class ScoringOpts(OptionGroup):
    """What a scored search reads (search, compare): the model and its data, the metric,
    EvoPress's generations, the scoring micro-batch and the backend."""

    model: ModelOpt = None
    data: DataOpts = DataOpts()
    metric: MetricOpt = None
    generations: GenerationsOpt = None
    micro_batch_tokens: MicroBatchOpt = None
    run_on: BackendOpts = BackendOpts()

    def overrides(self) -> dict[str, Any]:
        """Config overrides of these options (not ``--generations``: see the commands)."""
        return {
            "model": self.model,
            "evaluator__micro_batch_tokens": self.micro_batch_tokens,
            **self.data.overrides(self.metric),
            **self.run_on.overrides(),
        }


@dataclasses.dataclass(frozen=True)
class QuantizeOpts(OptionGroup):
    """``build --quantizer``: --quantizer, --bits, --group-size, --symmetric."""

    quantizer: QuantizerOpt = None
    bits: BitsOpt = "2,3,4,8"
    group_size: GroupSizeOpt = 128
    symmetric: SymmetricOpt = True


def data_overrides(
    calibration: str | None, seq_len: int | None, calibration_seqs: int | None
) -> dict[str, Any]:
    """Config overrides of the calibration options."""
    return {
        "data__calibration": calibration,
        "data__seq_len": seq_len,
        "data__n_calibration_seqs": calibration_seqs,
    }


def heldout_overrides(
    heldout: str | None, heldout_seqs: int | None, metric: str | None = None
) -> dict[str, Any]:
    """Config overrides of the held-out and metric options."""
    return {
        "data__heldout": heldout,
        "data__n_heldout_seqs": heldout_seqs,
        "evaluator__metric": metric,
    }


def backend_overrides(
    backend: str | None,
    workers: str | None,
    address: str | None,
    replace_timeout: float | None = None,
) -> dict[str, Any]:
    """Config overrides of the backend options (see :meth:`BackendOpts.overrides`)."""
    count: int | str | None = workers
    if workers is not None:
        try:
            count = int(workers)
        except ValueError:
            count = workers.strip()
    return {
        "backend__kind": backend,
        "backend__workers": count,
        "backend__address": address or os.environ.get("RAY_ADDRESS"),
        "backend__replace_timeout_s": replace_timeout,
    }


def _is_group(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, OptionGroup)


def _options(kind: type, how: Any) -> list[inspect.Parameter]:
    """The options a group stands for, in order (a nested group's where it stands)."""
    hints = typing.get_type_hints(kind, include_extras=True)
    out: list[inspect.Parameter] = []
    for f in dataclasses.fields(kind):
        if _is_group(hints[f.name]):
            out += _options(hints[f.name], how)
        else:
            out.append(inspect.Parameter(f.name, how, default=f.default, annotation=hints[f.name]))
    return out


def _collect(kind: type, kwargs: dict[str, Any]) -> Any:
    """The group's value from (and taken out of) the command's keyword arguments."""
    hints = typing.get_type_hints(kind, include_extras=True)
    values = {
        f.name: _collect(hints[f.name], kwargs) if _is_group(hints[f.name]) else kwargs.pop(f.name)
        for f in dataclasses.fields(kind)
    }
    return kind(**values)


def with_options(fn):
    """A command whose :class:`OptionGroup` parameters stand for their options.

    Typer reads the wrapper's signature, in which each group parameter is replaced, in
    place, by the group's options (so ``--help`` lists them there; a group's own groups
    likewise); the wrapper collects them back into the group's value for ``fn``.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in inspect.signature(fn).parameters.values():
        kind = hints.get(p.name, p.annotation)
        if _is_group(kind):
            groups[p.name] = kind
            params += _options(kind, p.kind)
        else:
            params.append(p.replace(annotation=kind))

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for name, kind in groups.items():
            kwargs[name] = _collect(kind, kwargs)
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    return wrapper
