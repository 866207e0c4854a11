"""The memory plan: what a run needs, per process, from the model's ``config.json`` alone.

:func:`plan_memory` sizes a run before anything is loaded: from a Hugging Face
``config.json`` (no weights), a :class:`~allocsearch.config.RunConfig` (grid, pruner,
storage dtype, tokens, metric, strategy settings, workers) and the memory of the device
and the host (detected, or given), it computes the bytes each process holds, broken down
into model, supernet variants, teacher data, activations (and hidden states) and reference
states, for both execution modes:

* **resident** (:class:`~allocsearch.evaluate.evaluator.Evaluator`): every variant of every
  unit lives on the device, stacked per parameter role;
* **streaming** (:class:`~allocsearch.evaluate.streaming.StreamingEvaluator`): per
  block, only the levels a query's candidates use come to the device, with the next
  block prefetched (two blocks in flight); the hidden states of all of a query's
  candidates advance together; teacher data stays on the host.

It chooses resident when that fits the device with a margin, else streaming, else it
raises :class:`MemoryPlanError` with one line naming the shortfall and the changes that
would fit. It also gives the store's size on disk and, for streaming, the bytes moved to
the device per search generation.

Notation used in the formulas below (all sizes in bytes):

* ``a``: itemsize of the run's parameter dtype (``RunConfig.dtype``: 4 float32, 2 bf16);
  ``s``: itemsize of dense variants in the store (``storage_dtype``, ``"auto"`` = the
  model's dtype); variants are never upcast on load (store format 2).
* ``N_p``: weights of parameter ``p``; ``K_u``: valid levels of unit ``u`` (from the
  grid :func:`~allocsearch.supernet.factory.make_grid` builds, so small layers may have fewer).
* ``B``: blocks (assumed identical: a one-block copy of the config is planned and
  multiplied, which keeps a 70B plan to seconds); ``D`` hidden, ``F`` MLP width,
  ``H``/``H_kv`` query/kv heads, ``V`` vocabulary, ``T`` sequence length; ``R``
  sequences per call (``micro_batch_tokens // T``, at most the calibration set).
* teacher bytes per calibration token: ``4 V`` (kl: float32 log-probabilities), ``8 k``
  (topk_kl: float32 values + int32 ids), 0 (nll).
* mixtures of experts (:mod:`allocsearch.models.moe`): every expert's weights are block
  parameters and every expert's linears are units (one per block and projection with
  ``supernet.tie_experts``), so model, variants, store and streamed bytes count all experts,
  the router and the shared expert like any other parameter; ``F`` is one expert's width,
  and a block's MLP working set is the routed experts' as
  :func:`~allocsearch.models.moe_dispatch.expert_work_bytes` gives it for the dispatch the
  block uses on a call's tokens (sorted dispatch: the stacked expert weights and padded rows;
  captures in ``build``: all experts, their input taps and Gram matrices).

Resident evaluator, per process (these follow ``evaluator.py``; the plan is checked
against measured peaks by ``scripts/bench_plan.py``):

* model: the loaded parameters ``a sum_p N_p`` (the model stays referenced) plus the
  evaluator's stacked copies of every parameter that is not a stacked dense-variant
  role (norms, embeddings, head, and the dense weights under nested masks);
* variants: their stacks, the one device copy (nested: an int32 rank, ``4 N_p``, and the
  prune counts; dense: ``a K_u N_p``): the evaluator reads the store's memory-mapped
  variants one parameter at a time into them (the store's pages are page cache);
* teacher: teacher bytes per token x calibration tokens;
* reference: ``(B + 1) x fidelity x D x a`` for the largest fidelity whose states fit
  the evaluator's ``max_reference_bytes`` (1 GiB), as the evaluator caches them;
* activations: one scoring call (``candidates_per_call`` candidates of ``R``
  sequences: per candidate the gathered weights of a block ``a sum_block N_p``, the
  hidden carry ``2 R T D a``, and the larger of attention ``R H T^2 (8 + a) +
  R T (H + 2 H_kv) head_dim 2a`` / MLP ``3 R T F a`` (plus ``R T D (4 + a)``) and
  logits ``R T V (a + 8)``; and the call's teacher rows) or the construction (the
  dense copy the teacher forward uses ``a sum_p N_p``, the teacher data, one call),
  whichever is larger; on a CPU device their sum (glibc keeps freed buffers, measured),
  and with a bfloat16 model a float32 copy of the block stacks per call (XLA's CPU
  backend computes bf16 in float32); on a GPU the largest stack is assembled on the
  host first (host memory).

Streaming evaluator (:mod:`allocsearch.evaluate.streaming`), per process:

* model: the parameters outside the blocks (embeddings, head, final norm) on the
  device for the evaluator's lifetime, and two blocks' parameters that no unit owns;
* variants: a block's stacks hold ``min(n + 1, K_u)`` level slots per unit in the
  storage dtype (nested variants: the model's; ``n`` candidates and the reference riding
  along; a candidate's slot is cast to the model's dtype when it is used, counted with
  the activations), two blocks of them (this one, and the next, prefetched); on an
  accelerator also the next block's moved levels, at most ``P_u = min(n, K_u)`` per unit
  (``n`` the most candidates one actor scores in one query; unused slots repeat a moved
  level on the device), and the same moved levels twice in host staging buffers; on a
  CPU device the levels are read straight into the stacks' aligned host buffers, which
  the device aliases, so neither (the store's memory-mapped pages live in the shared
  page cache, not in any process);
* activations / hidden states: ``n x fidelity x D x a`` (the states of all of a
  query's candidates stay on the device between blocks) plus one call's working set
  (``candidates_per_call`` candidates of one micro-batch, as resident); on a CPU device
  at least the construction's (the teacher's streamed forward, freed before any query);
* teacher: on the host (all calibration tokens); the query's rows on the device;
* reference: as resident, on the device (the streaming evaluator keeps it there up to
  1 GiB).

Unit streaming (``stream_unit: unit``, :mod:`allocsearch.evaluate.unit_streaming`; the
mode ``streaming-unit``), per process: as streaming, with a unit group (q, k, v, o, gate,
up, down; a MoE's router, each expert, the shared expert; the block's norms with the
first group) in place of the block:

* model: the parameters outside the blocks, and two groups' parameters no unit owns;
* variants: the largest group's stacks, two of them (this group and the next, prefetched),
  and on an accelerator the next group's moved levels and their two host staging copies;
* activations: the hidden states ``n x fidelity x D x a`` plus, for the sublayer whose
  sum is larger, the intermediates all candidates keep between its steps (attention: q,
  k, v, ``(H + 2 H_kv) head_dim a`` per token; MLP: ``F a``; MoE: the routing weights and
  partial sum ``(E + D) a``) and one step's call (the group's gathered weights, the
  hidden carry, the step's working set: attention's, ``3 N F a`` for a dense MLP step,
  ``3 N max(F, F_s) a + 4 N E`` for an expert on every token; or the head's logits).

``auto`` chooses resident, else block streaming, else unit streaming (``stream_unit``
limits the streaming modes); the bytes read and moved are those of block streaming.

Bytes moved per generation (streaming): for every query of a generation, every block
moves ``sum_u P_u`` levels of each unit; EvoPress asks ``offspring`` candidates at
``tokens[0]``, then ``survivors[i-1]`` (``+ 1`` re-scored parent in the last stage) at
``tokens[i]``. This is an upper bound: a query moves only the distinct levels its
candidates use (an EvoPress child differs from its parent in a few units).

Page cache (streaming EvoPress): every query reads the parent's variants (one level of
every unit, nested units' rank files, the block weights no unit owns) through the page
cache; with them cached, a generation reads from disk at most its children's differing
units (``offspring x 2 max_switches`` units at the mean unit level, nested units nothing
new). The table states both and whether the host memory the plan leaves free holds them.

When nothing fits, the refusal names single changes that fit (:class:`Remedy`: the config
keys and command-line options that make each), found by re-planning with each.

The driver keeps the model memory-mapped on the host (``load_workspace`` loads it
lazily) and the search state while the actors score, the final held-out perplexity
included (on an actor): it needs no device memory. With ``backend.kind = "local"`` the
driver is the evaluator.
"""

from allocsearch.plan.base import (
    DEFAULT_MARGIN,
    EXECUTION_MODES,
    GIB,
    MemoryPlanError,
    Remedy,
    detect_memory,
    format_bytes,
    load_hf_config,
    parse_bytes,
)
from allocsearch.plan.core import (
    UNIT_STREAMING,
    check_run,
    execution_for,
    plan_memory,
    stream_unit_for,
)

# the formulas' pieces, for tests that check them by hand
from allocsearch.plan.layout import _adapter, _Layout, _layout, _Model, _Param, refuse_foreign_store  # noqa: F401
from allocsearch.plan.report import CATEGORIES, MemoryPlan, ProcessMemory
from allocsearch.plan.workload import _queries  # noqa: F401

__all__ = [
    "CATEGORIES",
    "DEFAULT_MARGIN",
    "EXECUTION_MODES",
    "GIB",
    "MemoryPlan",
    "MemoryPlanError",
    "ProcessMemory",
    "Remedy",
    "check_run",
    "detect_memory",
    "execution_for",
    "stream_unit_for",
    "UNIT_STREAMING",
    "format_bytes",
    "load_hf_config",
    "parse_bytes",
    "plan_memory",
    "refuse_foreign_store",
]
