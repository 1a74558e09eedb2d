"""Counts in words for messages: "1 probe", "2 probes".

Plain Python, importable from every module (torch-free, rich-free).
"""

from __future__ import annotations


def plural(count: float, noun: str, plural_noun: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is 1.

    The plural is ``noun + "s"`` unless given (``batch`` -> ``batches`` is known). Whole counts
    get thousands separators; a mean such as 12.5 keeps one decimal.

    >>> plural(1, "probe"), plural(0, "probe"), plural(2, "probe row")
    ('1 probe', '0 probes', '2 probe rows')
    >>> plural(1, "batch"), plural(3, "batch"), plural(2, "child", "children")
    ('1 batch', '3 batches', '2 children')
    >>> plural(12.5, "HVP"), plural(2.0, "gradient"), plural(5990, "training step")
    ('12.5 HVPs', '2 gradients', '5,990 training steps')
    """
    number = f"{count:,.1f}" if not float(count).is_integer() else f"{int(count):,}"
    if count == 1:
        return f"{number} {noun}"
    if plural_noun is None:
        plural_noun = noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")
    return f"{number} {plural_noun}"
