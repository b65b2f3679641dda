"""Entropy-coefficient schedules λ(s, S) for the phased token-entropy term (spec §2.3).

λ > 0 maximises token entropy (exploration), λ < 0 minimises it (exploitation); see ``loss.grpo_loss``.
Every schedule is a pure function of the global optimizer step ``s`` (0-indexed) and the total number of
optimizer steps ``S``: no internal state, so a run resumed at step k continues exactly where it left off.
One class per schedule with plain ``__init__`` arguments, so LightningCLI/jsonargparse can build them from YAML
(``class_path``) and :func:`schedule_from_config` can build them from a name.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

Transition = Literal["hard", "linear", "cosine"]


def _check_magnitude(option: str, value: float) -> float:
    """λ_max and λ_min are magnitudes: the sign comes from the phase, so a negative value is a config error."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{option}={value!r} is not allowed; it must be a finite number >= 0 (a magnitude).")
    return float(value)


def _check_fraction(option: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{option}={value!r} is not allowed; it must be a number in [0, 1].")
    return float(value)


def _check_step(step: int, total_steps: int) -> None:
    if step < 0:
        raise ValueError(f"step={step!r} is not allowed; optimizer steps are counted from 0.")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; it must be >= 1.")


class EntropySchedule:
    """Base class: ``schedule(step, total_steps) -> λ``. Subclasses implement :meth:`value`."""

    name: ClassVar[str] = ""

    def __call__(self, step: int, total_steps: int) -> float:
        """λ at global optimizer step ``step`` (0-indexed) of a run with ``total_steps`` optimizer steps."""
        _check_step(step, total_steps)
        return self.value(int(step), int(total_steps))

    def value(self, step: int, total_steps: int) -> float:
        raise NotImplementedError

    def switch_step(self, total_steps: int) -> int | None:
        """First Stage-2 step ``s_sw`` (None for schedules without a switch)."""
        return None

    def hparams(self) -> dict[str, Any]:
        """Name and init arguments, for logging as hyperparameters and for :func:`schedule_from_config`."""
        return {"name": self.name, **{k.lstrip("_"): v for k, v in vars(self).items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items() if k != "name")
        return f"{type(self).__name__}({args})"


class NoEntropy(EntropySchedule):
    """λ ≡ 0: vanilla GRPO (entropy is still logged, computed without grad)."""

    name = "none"

    def value(self, step: int, total_steps: int) -> float:
        return 0.0


class ConstMax(EntropySchedule):
    """λ ≡ +λ_max: entropy maximisation throughout ("GRPO w. Max")."""

    name = "const_max"

    def __init__(self, lam_max: float = 1e-2) -> None:
        self.lam_max = _check_magnitude("lam_max", lam_max)

    def value(self, step: int, total_steps: int) -> float:
        return self.lam_max


class ConstMin(EntropySchedule):
    """λ ≡ −λ_min: entropy minimisation throughout ("GRPO w. Min")."""

    name = "const_min"

    def __init__(self, lam_min: float = 1e-2) -> None:
        self.lam_min = _check_magnitude("lam_min", lam_min)

    def value(self, step: int, total_steps: int) -> float:
        return -self.lam_min


class MaxToMin(EntropySchedule):
    """Two-stage schedule of the paper: +λ_max for ``s < s_sw``, then −λ_min, ``s_sw = floor(switch_frac·S)``.

    ``transition="linear"``/``"cosine"`` replace the hard switch by a ramp of ``round(width_frac·S)`` steps centred
    on ``s_sw`` (ablations; they pass through λ = 0). Steps ``s >= S`` keep the Stage-2 value.
    """

    name = "max_to_min"

    def __init__(
        self,
        lam_max: float = 1e-2,
        lam_min: float = 1e-2,
        switch_frac: float = 0.8,
        transition: Transition = "hard",
        width_frac: float = 0.0,
    ) -> None:
        self.lam_max = _check_magnitude("lam_max", lam_max)
        self.lam_min = _check_magnitude("lam_min", lam_min)
        self.switch_frac = _check_fraction("switch_frac", switch_frac)
        if transition not in get_args(Transition):
            raise ValueError(f"transition={transition!r} is not allowed; choose one of {list(get_args(Transition))}.")
        self.transition = transition
        self.width_frac = _check_fraction("width_frac", width_frac)
        if transition != "hard" and self.width_frac == 0:
            raise ValueError(f"transition={transition!r} needs width_frac > 0 (got 0); use transition='hard' instead.")

    def _endpoints(self) -> tuple[float, float]:
        """(Stage-1 value, Stage-2 value)."""
        return self.lam_max, -self.lam_min

    def switch_step(self, total_steps: int) -> int:
        # round() first: 0.29 * 100 is 28.999999999999996 in floating point and would floor to 28.
        return math.floor(round(self.switch_frac * total_steps, 9))

    def progress(self, step: int, total_steps: int) -> float:
        """Position u ∈ [0, 1] between the Stage-1 (0) and the Stage-2 (1) value."""
        s_sw = self.switch_step(total_steps)
        width = round(self.width_frac * total_steps)
        if self.transition == "hard" or width == 0:
            return 1.0 if step >= s_sw else 0.0
        u = min(max((step - (s_sw - width // 2)) / width, 0.0), 1.0)
        return (1 - math.cos(math.pi * u)) / 2 if self.transition == "cosine" else u

    def value(self, step: int, total_steps: int) -> float:
        a, b = self._endpoints()
        u = self.progress(step, total_steps)
        return (1 - u) * a + u * b  # exact endpoints at u = 0 and u = 1, unlike a + (b − a)·u


class MinToMax(MaxToMin):
    """The reversed ablation: −λ_min for ``s < s_sw``, then +λ_max (same arguments as :class:`MaxToMin`)."""

    name = "min_to_max"

    def _endpoints(self) -> tuple[float, float]:
        return -self.lam_min, self.lam_max


SCHEDULES: dict[str, type[EntropySchedule]] = {
    cls.name: cls for cls in (NoEntropy, ConstMax, ConstMin, MaxToMin, MinToMax)
}


def schedule_from_config(config: str | dict[str, Any] | EntropySchedule | None, **kwargs: Any) -> EntropySchedule:
    """Build a schedule from a name (``"max_to_min"``), a dict ``{"name": ..., **args}``, an instance or None (λ ≡ 0).

    Extra ``kwargs`` are init arguments; an unknown name or argument raises ``ValueError`` listing what is allowed.
    """
    if config is None:
        return NoEntropy()
    if isinstance(config, EntropySchedule):
        if kwargs:
            raise ValueError(f"arguments {sorted(kwargs)} cannot be applied to an already built {config!r}.")
        return config
    if isinstance(config, dict):
        config = dict(config)
        kwargs = {**config, **kwargs}
        config = kwargs.pop("name", None)
    if config not in SCHEDULES:
        raise ValueError(f"entropy schedule name={config!r} is not allowed; choose one of {sorted(SCHEDULES)}.")
    cls = SCHEDULES[config]
    try:
        return cls(**kwargs)
    except TypeError as err:  # unknown keyword: name the schedule and its real arguments
        raise ValueError(f"bad arguments {sorted(kwargs)} for entropy schedule {config!r}: {err}") from err


def stage_label(coef: float) -> str:
    """Human-readable phase of a coefficient, for the log line that names the active stage."""
    if coef > 0:
        return "explore (entropy maximisation)"
    return "exploit (entropy minimisation)" if coef < 0 else "entropy term off"
