"""The low-rank gradient-projection optimizer family (docs/algorithms.md): pure single-process math.

``build_optimizer(model, optim_cfg)`` is the entry point; ``LowRankAdamW`` / ``ProjFactor`` the classes;
``memory_report`` / ``switch_report`` what the trainer logs. Never imports torch.distributed: the distributed
layer plugs in through ``subspace.Comm`` (``LowRankAdamW.set_comm``, ``LowRankAdamW.stats_comm``).
"""

from .dropin import ApolloAdamW, GaLoreAdamW, LotusAdamW
from .in_backward import OptimizerInBackward, units_of
from .lowrank import LowRankAdamW
from .methods import METHODS, PROJECTED_MODULES, build_optimizer, route_parameters
from .options import LOWRANK_DEFAULTS
from .projfactor import ProjFactor
from .reports import gathered_switch_report, memory_report, solver_fallback_report, switch_report
from .subspace import Comm

__all__ = [
    "LowRankAdamW",
    "ProjFactor",
    "build_optimizer",
    "memory_report",
    "switch_report",
    "gathered_switch_report",
    "solver_fallback_report",
    "METHODS",
    "LOWRANK_DEFAULTS",
    "PROJECTED_MODULES",
    "route_parameters",
    "Comm",
    "OptimizerInBackward",
    "units_of",
    "ApolloAdamW",
    "GaLoreAdamW",
    "LotusAdamW",
]
