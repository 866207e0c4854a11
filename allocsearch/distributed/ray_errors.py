"""What goes wrong with Ray workers: actors that cannot start, calls that keep failing,
a lost head node, a worker given up."""

from __future__ import annotations


class WorkerStartError(RuntimeError):
    """Evaluator actors could not be started (factory failed, or not enough resources)."""


class WorkerFailedError(RuntimeError):
    """A call kept failing because the actors running it died, or no actor is left."""


class HeadNodeLostError(WorkerFailedError):
    """The Ray node of this driver (the head node of a local instance, or the node the
    driver joined) is gone: the search cannot go on; its checkpoints are kept, and the
    message names ``--resume``."""


class WorkerLostWarning(RuntimeWarning):
    """An actor died and could not be replaced in time: the pool goes on without it."""
