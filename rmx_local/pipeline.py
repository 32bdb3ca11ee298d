"""`rmx-local run`: the method on one recipe, holding the run folder's lock (a second run on the same folder stops at
once). One round (round.py) by default; `rounds` > 1 repeats it, sampling from the previous round's adapted model
(rounds.py); `sweep.enabled` trains several variants on one set of rollouts and keeps the best on validation
(sweep.py). Under torchrun / accelerate launch each process is one rank (distributed.py).
"""

from __future__ import annotations

from rmx_local import distributed as dist
from rmx_local.backends import pick_backend_name
from rmx_local.model_check import check_model_source
from rmx_local.recipe import Recipe
from rmx_local.round import run_round
from rmx_local.rounds import run_rounds
from rmx_local.sweep import run_sweep
from rmx_local.ui import UI


def run_pipeline(recipe: Recipe, ui: UI | None = None) -> dict:
    """The whole method on `recipe` (see the module docstring); returns the run's summary."""
    ui = ui or UI()
    dist.init()  # torchrun / accelerate launch: one process per device (rmx_local/distributed.py)
    dist.check_supported(recipe, pick_backend_name(recipe.backend))
    if recipe.fsdp and dist.world() > 1:
        dist.start_fsdp()  # shard the frozen base's decoder layers from here on
    with dist.run_lock(recipe.run_dir, ui.line):
        check_model_source(recipe.model)  # before any stage: an unusable model is one line
        if recipe.sweep.enabled:
            return run_sweep(recipe, ui)
        if recipe.rounds > 1:
            return run_rounds(recipe, ui)
        return run_round(recipe, ui)
