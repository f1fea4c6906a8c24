"""Optimisation algorithms that are more than a parameter update rule of torch's kind: the proximal-point method
with the Frobenius or the Wasserstein-2 distance between neurons (:class:`ProximalPoint`).

(``zoo.tasks.optim`` holds what a task does with an optimiser: weight-decay parameter groups, learning-rate
schedules, the injected optimiser factories; ``zoo.optim`` holds optimisers.)
"""

from zoo.optim.proximal import (
    DISTANCES,
    ProximalPoint,
    frobenius_squared,
    optimal_assignment,
    particle_distance_squared,
    particles,
    wasserstein2_squared,
)

__all__ = [
    "DISTANCES",
    "ProximalPoint",
    "frobenius_squared",
    "optimal_assignment",
    "particle_distance_squared",
    "particles",
    "wasserstein2_squared",
]
