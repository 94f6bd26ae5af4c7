"""Client-level differential privacy for the Stage-1 updates of phi_g (docs/METHOD.md "Privacy").

With ``dp.enabled``, every Stage-1 round releases

    phi_g' = phi_g + (1 / m) * ( sum_k clip_C(Delta_k) + N(0, (z C)^2 I) )

where Delta_k = phi_g^k - phi_g is client k's update, clip_C scales it to an
L2 norm (over all of phi_g's tensors) of at most C = ``dp.clipping-norm``,
z = ``dp.noise-multiplier`` and m is the number of clients *sampled* in the
round (not the number that replied: the noise does not shrink when a client
drops out). The mean is uniform: weighting by n_k would give a client with
many samples a larger sensitivity than C / m, so under DP no client counts
more than another.

Clipping happens on the client (Flower's ``fixedclipping_mod``); the server
checks every update's norm again before it aggregates, and adds the noise.

Accounting (:class:`PrivacyAccountant`): Google's ``dp_accounting`` RDP
accountant, with the sampling as it happens: round 1 with every client (a
Gaussian mechanism), later rounds m of K clients drawn without replacement
(``SampledWithoutReplacementDpEvent``, Wang, Balle and Kasiviswanathan 2019),
under the replace-one neighbouring relation (the number of clients K is
public). Replacing one client's clipped update changes the sum by up to 2C,
so the Gaussian's noise multiplier relative to that sensitivity is z / 2.

Protected: every phi_g the server releases, i.e. the Stage-1 updates. Not
protected: the metrics a reply carries (its train-set size, losses, the
evaluation's per-class counts), and Stage 2, whose phi_k never leaves the
client.

Pure library code: no Flower imports.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

Tensors = Mapping[str, torch.Tensor]


def update_norm(new: Tensors, old: Tensors) -> float:
    """||new - old||_2 over all tensors together (float64)."""
    return math.sqrt(sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old))


def clip_update(new: Tensors, old: Tensors, clipping_norm: float) -> dict[str, torch.Tensor]:
    """old + Delta * min(1, C / ||Delta||), Delta = new - old (the update clipped to norm C)."""
    norm = update_norm(new, old)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: (old[k].double() + (new[k].double() - old[k].double()) * scale).to(old[k].dtype) for k in old}


def noise_std(noise_multiplier: float, clipping_norm: float, sampled: int) -> float:
    """Standard deviation of the noise on the mean update: z C / m."""
    return noise_multiplier * clipping_norm / sampled


def private_mean(
    phi_g: Tensors,
    updated: Sequence[Tensors],
    sampled: int,
    noise_multiplier: float,
    clipping_norm: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """phi_g + (sum of the clipped updates + N(0, (z C)^2 I)) / m: the released phi_g.

    ``updated``: the clients' phi_g^k, already clipped (they are clipped again here, which
    changes nothing for a compliant client); ``sampled``: m, the clients sampled this round.
    ``generator`` draws the noise (None: a generator seeded from the operating system's
    randomness; a seeded one only for tests).
    """
    if sampled < max(1, len(updated)):
        raise ValueError(f"{len(updated)} updates from {sampled} sampled clients")
    total = {key: torch.zeros(value.shape, dtype=torch.float64) for key, value in phi_g.items()}
    for update in updated:
        clipped = clip_update(update, phi_g, clipping_norm)
        for key, value in phi_g.items():
            total[key] += clipped[key].double() - value.double()
    return noised_release(phi_g, total, sampled, noise_multiplier, clipping_norm, generator)


def noised_release(
    phi_g: Tensors,
    total: Tensors,
    sampled: int,
    noise_multiplier: float,
    clipping_norm: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """phi_g + (total + N(0, (z C)^2 I)) / m, where ``total`` is the sum of the clipped updates
    (under SecAgg+ the server knows only this sum); computed in float64, returned in phi_g's dtypes.
    ``generator`` as in :func:`private_mean`."""
    if generator is None:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    std = noise_std(noise_multiplier, clipping_norm, sampled)
    out = {}
    for key, value in phi_g.items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
        out[key] = (value.double() + total[key].double() / sampled + noise).to(value.dtype)
    return out


@dataclass
class PrivacyAccountant:
    """(epsilon, delta) of the Stage-1 releases so far, by dp_accounting's RDP accountant."""

    noise_multiplier: float
    population: int
    delta: float
    releases: list[tuple[int, int]] = field(default_factory=list)  # (sampled, population) per round

    def add_round(self, sampled: int) -> None:
        if not 0 < sampled <= self.population:
            raise ValueError(f"{sampled} sampled clients of {self.population}")
        self.releases.append((sampled, self.population))

    def epsilon(self) -> float:
        """epsilon at :attr:`delta` after every release so far (0 before the first)."""
        if not self.releases:
            return 0.0
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)  # replace-one: sensitivity 2C
        # Equal releases composed at once (the RDP of an event is computed once per kind; same value).
        for (sampled, population), count in Counter(self.releases).items():
            event = (
                gaussian
                if sampled == population
                else dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian)
            )
            accountant.compose(event, count)
        return float(accountant.get_epsilon(self.delta))

    def report(self, clipping_norm: float) -> dict[str, float]:
        """The ``privacy.*`` entries of a round: epsilon, delta, noise multiplier, clipping norm."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": clipping_norm,
        }


def noise_for_epsilon(target: float, delta: float, population: int, sampled: Sequence[int]) -> float:
    """The smallest noise multiplier z (to 1e-2 relative) whose releases of ``sampled`` clients per round
    (of ``population``) stay within ``target`` epsilon at ``delta``; bisection on dp_accounting's RDP."""

    def eps(z: float) -> float:
        accountant = PrivacyAccountant(z, population, delta)
        for m in sampled:
            accountant.add_round(m)
        return accountant.epsilon()

    low, high = 1e-2, 1.0
    while eps(high) > target:
        high *= 2.0
        if high > 1e4:
            raise ConfigError(
                f"dp.target-epsilon = {target:g} is out of reach: no noise multiplier up to 1e4 gives it at "
                f"dp.delta = {delta:g} over {len(sampled)} releases; raise dp.target-epsilon or dp.delta"
            )
    while (high - low) / high > 1e-2:
        mid = (low + high) / 2.0
        low, high = (mid, high) if eps(mid) > target else (low, mid)
    return high
