"""What the CPU bench scripts share for timing their sides in turns (A, B, A, B, ...: machine noise hits both
sides of a turn alike): a ratio reported as the median of the turns' ratios, with its range."""
from __future__ import annotations

import statistics


def ratio_over_turns(numerators: list[float], denominators: list[float], digits: int = 2) -> str:
    """'1.23x (1.10-1.40 over 3 turns)': the median and range of each turn's numerator / denominator."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return (f"{statistics.median(ratios):.{digits}f}x ({min(ratios):.{digits}f}-{max(ratios):.{digits}f} over "
            f"{len(ratios)} turns)")


def in_turns(sides: dict, turns: int) -> dict[object, list]:
    """{side: [its value in each turn]}: every side called once a turn, turn t starting at the t-th side (so none
    is always first: a cache or clock warmed by the turn's start helps each side alike over the turns)."""
    names = list(sides)
    out = {name: [] for name in names}
    for turn in range(turns):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            out[name].append(sides[name]())
    return out
