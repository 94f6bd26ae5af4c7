"""The round plan a method declares and the ServerApp executes, step by step.

A run is a sequence of :class:`Step`\\ s: the zero-shot evaluation, then the
method's Stage-1 rounds, personalization rounds and evaluations. Each step
says which messages go out (Stage-1 training to the sampled clients,
personalization to the sampled or to all clients, PM evaluation) and what the
server evaluates afterwards. The ServerApp checks every reply of every step,
checkpoints after each step and, on resume, skips the steps already done.

    plan = method.plan()
    print(plan.describe())

Pure library code: no Flower, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["zero-shot", "global", "personal", "final"]
Personalize = Literal["", "sampled", "all"]


@dataclass(frozen=True)
class Step:
    """One step of a run, recorded as one entry of ``results.json``'s ``rounds``.

    - ``train``: Stage-1 messages to the sampled clients, then FedAvg of phi_g;
    - ``personalize``: personalization messages, to the clients sampled in this
      step (``"sampled"``, the interleaved schedule) or to all clients (``"all"``);
    - ``gm``: the server evaluates phi_g on the balanced test set after the step;
    - ``pm``: PM evaluation on the clients' own test sets (with ``personalize="all"``,
      inside the personalization messages; otherwise an evaluation exchange).
    """

    round: int
    phase: Phase
    train: bool = False
    personalize: Personalize = ""
    gm: bool = False
    pm: bool = False


@dataclass(frozen=True)
class RoundPlan:
    """The steps of a run, in order; ``steps[0]`` is always the zero-shot evaluation."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0].phase != "zero-shot":
            raise ValueError("a round plan starts with the zero-shot step")
        rounds = [step.round for step in self.steps]
        if rounds != sorted(rounds):
            raise ValueError(f"a round plan's rounds must not decrease, got {rounds}")

    @property
    def total_rounds(self) -> int:
        return self.steps[-1].round

    def describe(self) -> str:
        """One line per run of similar steps, e.g. ``rounds 1-30  global: train, GM``."""
        lines, start = [], 0
        for i in range(1, len(self.steps) + 1):
            if i < len(self.steps) and _shape(self.steps[i]) == _shape(self.steps[start]):
                continue
            first, last = self.steps[start], self.steps[i - 1]
            span = f"round {first.round}" if first is last else f"rounds {first.round}-{last.round}"
            lines.append(f"{span:<14} {first.phase:<9} {_actions(self.steps[start:i])}")
            start = i
        return "\n".join(lines)


def _shape(step: Step) -> tuple:
    return step.phase, step.train, step.personalize


def _actions(steps: tuple[Step, ...]) -> str:
    step = steps[0]
    parts = []
    if step.train:
        parts.append("train the sampled clients, aggregate phi_g")
    if step.personalize:
        parts.append(f"personalize {'the sampled' if step.personalize == 'sampled' else 'all'} clients")

    def when(flag: str) -> str | None:
        marked = [s for s in steps if getattr(s, flag)]
        if not marked:
            return None
        every = "" if len(marked) == len(steps) else f" ({len(marked)} of {len(steps)} steps)"
        return f"{flag.upper()} evaluation{every}"

    parts += [text for text in (when("gm"), when("pm")) if text]
    return "; ".join(parts) or "nothing"


def due(index: int, count: int, every: int) -> bool:
    """Evaluate after the ``index``-th (1-based) of ``count`` steps: every ``every`` steps and the last."""
    return index % every == 0 or index == count


def standard_plan(
    global_rounds: int,
    personal_rounds: int = 0,
    eval_every: int = 1,
    interleaved: bool = False,
) -> RoundPlan:
    """Zero-shot, ``global_rounds`` Stage-1 rounds, then ``personal_rounds`` personalization rounds
    on all clients.

    ``interleaved``: every Stage-1 round also personalizes its sampled clients, and PM is
    evaluated with GM. A plan without any later step that evaluates PM ends with a PM
    evaluation of its last global model (recorded under the last round, phase ``final``).
    """
    steps = [Step(0, "zero-shot", gm=True, pm=True)]
    for r in range(1, global_rounds + 1):
        evaluate = due(r, global_rounds, eval_every)
        steps.append(
            Step(
                r,
                "global",
                train=True,
                personalize="sampled" if interleaved else "",
                gm=evaluate,
                pm=evaluate and interleaved,
            )
        )
    for k in range(1, personal_rounds + 1):
        steps.append(Step(global_rounds + k, "personal", personalize="all", pm=due(k, personal_rounds, eval_every)))
    if global_rounds and not any(step.pm for step in steps[1:]):
        steps.append(Step(global_rounds + personal_rounds, "final", pm=True))
    return RoundPlan(tuple(steps))


__all__ = ["RoundPlan", "Step", "due", "standard_plan"]
