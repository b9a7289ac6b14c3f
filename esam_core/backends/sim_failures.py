"""Which SAM failures the simulator injects: their rates (``FailureRates``) and, per scene and
seed, which entities fail how (``plan_failures``). The failures themselves are described in
``esam_core.backends.simulator``; every draw is keyed by (seed, what it is for), so answers never
depend on call order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from esam_core.backends.sim_scenes import SimScene


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator seeded by ``key`` alone (the same key, the same draws)."""
    return np.random.default_rng([abs(int(k)) for k in key])


@dataclass(frozen=True)
class FailureRates:
    """How often each SAM failure is injected (probabilities; ``jitter_cells`` is an amplitude)."""

    jitter: float = 0.6
    jitter_cells: float = 0.7  # in SAM low-res cells (4 px of SAM's 1024-px input)
    merge: float = 0.25
    part: float = 0.3
    low_conf: float = 0.5
    small_miss: float = 0.5

    MODES = ("jitter", "merge", "part", "low_conf", "small_miss")

    def scaled(self, factor: float) -> FailureRates:
        """Every rate (and the jitter amplitude) times ``factor``, rates clipped to [0, 1]."""
        return FailureRates(**{k: (v * factor if k == "jitter_cells" else min(1.0, v * factor))
                               for k, v in dataclasses.asdict(self).items()})

    def only(self, mode: str) -> FailureRates:
        """These rates with every failure but ``mode`` switched off ("none": all off)."""
        if mode not in (*self.MODES, "none"):
            raise ValueError(f"unknown failure mode {mode!r}; expected one of {self.MODES}")
        return dataclasses.replace(self, **{m: 0.0 for m in self.MODES if m != mode})


DEFAULT_RATES = FailureRates()


def plan_failures(scene: SimScene, entity_map: np.ndarray, rates: FailureRates, seed: int
                  ) -> tuple[list[dict], dict[int, list[int]]]:
    """Which entities fail how (drawn once per seed), and their touching neighbours.

    Args:
        entity_map: (H, W) int64 entity id per pixel (``scene.entity_map``).

    Returns:
        (plan, neighbours): ``plan[e]`` holds ``merge`` (the neighbour merged in), ``part``,
        ``low_conf`` and ``small_miss`` (the neighbour answered instead) for entity e;
        ``neighbours[e]`` the sorted ids of the entities touching it.
    """
    emap = entity_map
    n_ent = len(scene.annotated)
    a, b = np.concatenate([emap[:, :-1].ravel(), emap[:-1, :].ravel()]), \
        np.concatenate([emap[:, 1:].ravel(), emap[1:, :].ravel()])
    cross = a != b
    pairs, contact = np.unique(np.stack([np.minimum(a, b)[cross], np.maximum(a, b)[cross]]),
                               axis=1, return_counts=True)
    touch: dict[int, dict[int, int]] = {i: {} for i in range(n_ent)}
    for (i, j), c in zip(pairs.T, contact):
        touch[int(i)][int(j)] = touch[int(j)][int(i)] = int(c)
    neighbours = {i: sorted(t) for i, t in touch.items()}
    area = np.bincount(emap.ravel(), minlength=n_ent)
    hh, ww = emap.shape
    small_px = 4.0 * (hh / 32) * (ww / 32)  # a few cells of SAM's 32-point grid
    parts_per_entity = np.bincount(scene.part_entity, minlength=n_ent)
    r = rates
    plans: list[dict] = []
    for e in range(n_ent):
        rng = keyed_rng(seed, 1, e)
        draws = rng.random(4)
        nbrs = touch[e]
        plan: dict = {}
        if nbrs and draws[0] < r.merge:
            keys = np.array(sorted(nbrs))
            weights = np.array([nbrs[k] for k in keys], np.float64)
            plan["merge"] = int(rng.choice(keys, p=weights / weights.sum()))
        plan["part"] = bool(parts_per_entity[e] >= 2 and draws[1] < r.part)
        plan["low_conf"] = bool(scene.ambiguous[e] and draws[2] < r.low_conf)
        if nbrs and 0 < area[e] < small_px and draws[3] < r.small_miss:
            plan["small_miss"] = max(nbrs, key=lambda k: (nbrs[k], -k))
        plans.append(plan)
    return plans, neighbours
