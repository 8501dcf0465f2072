"""Checks of the nodes' inputs where a node receives them: each refusal names the node, the input, what was
expected and what was found. ComfyUI checks a widget's min/max only for a value typed in the widget (a NaN passes
its comparisons), never a value arriving through a link. Imports no ComfyUI module.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["APPLY", "ENCODE", "check_finite", "check_number"]

APPLY = "Apply CustomContrast"
ENCODE = "CustomContrast Encode Subject"


def check_number(node: str, name: str, value, low: float, high: float, whole: bool = False) -> float:
    """``value`` as a float if it is a finite number in [low, high] (a whole one with ``whole``); ValueError
    naming the input otherwise."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or not low <= number <= high or (whole and number != int(number)):
        kind = "whole" if whole else "finite"
        raise ValueError(f"{node}: {name} must be a {kind} number from {low:g} to {high:g}, found {value!r}")
    return number


def check_finite(node: str, name: str, values: Tensor, expected: str, axes: tuple[str, ...]) -> None:
    """Refuses NaN and infinite values, counting them and locating the first along the named ``axes``;
    ``expected`` completes '<node>: <name> must ...'."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    nan = int(torch.isnan(values).sum())
    inf = int(bad.sum()) - nan
    found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
    first = ", ".join(f"{axis} {int(i)}" for axis, i in zip(axes, torch.nonzero(bad)[0]))
    raise ValueError(f"{node}: {name} must {expected}, found {found} value(s) (the first at {first})")
