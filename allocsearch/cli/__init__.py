"""The ``allocsearch`` command line: demo, build, search, compare, sweep, export, apply, eval.

User errors (bad configs, files, budgets, recipes, stores) print one clear message and
exit with status 2, without a traceback; outputs are written atomically and existing
ones are refused unless ``--overwrite``.

Where things are: the app, errors and the config overrides in :mod:`.common`; every option
declared once in :mod:`.options`; the commands in :mod:`.cmd_run` (demo, search, compare,
sweep), :mod:`.cmd_build` (build) and :mod:`.cmd_model` (export, apply, eval, plan),
registered below in the order ``--help`` lists them.
"""

from __future__ import annotations

import sys

from allocsearch.cli.cmd_build import build
from allocsearch.cli.cmd_model import EXPORT_FORMATS, apply, eval_, export, plan
from allocsearch.cli.cmd_run import compare, demo, search, sweep
from allocsearch.cli.common import (
    EXIT_USER_ERROR,
    UserError,
    _default_target,
    _user_errors,
    app,
    console,
    handle_errors,
    out_console,
)

__all__ = [
    "EXIT_USER_ERROR",
    "EXPORT_FORMATS",
    "UserError",
    "_default_target",
    "_user_errors",
    "app",
    "console",
    "handle_errors",
    "main",
    "out_console",
]

for _command in (demo, build, search, compare, sweep, export, apply):
    app.command()(_command)
app.command(name="eval")(eval_)
app.command()(plan)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
