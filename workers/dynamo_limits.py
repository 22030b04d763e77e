"""Dynamo's graph limit for the parts epd compiles (decoder layers, vision towers).

Dynamo keeps at most `recompile_limit` graphs per function, then runs it
eagerly without a word. A worker needs a few for each compiled function (one
token or several, one item or several, on each thread count it uses); a process
holding parts of several models or dtypes (the engine benchmark, the tests)
needs a few for each of them, so the default of 8 is raised."""

from __future__ import annotations

import torch

GRAPHS_PER_FUNCTION = 64


def allow_graphs() -> None:
    """Let every compiled function keep up to GRAPHS_PER_FUNCTION graphs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_FUNCTION)
