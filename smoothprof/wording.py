"""Counts in words for messages: "1 probe", "2 probes".

Plain Python, importable from every module (torch-free, rich-free).
"""

from __future__ import annotations


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is 1.

    The plural is ``noun + "s"`` unless given (``batch`` -> ``batches`` is known).

    >>> plural(1, "probe"), plural(0, "probe"), plural(2, "probe row")
    ('1 probe', '0 probes', '2 probe rows')
    >>> plural(1, "batch"), plural(3, "batch"), plural(2, "child", "children")
    ('1 batch', '3 batches', '2 children')
    """
    if count == 1:
        return f"{count} {noun}"
    if plural_noun is None:
        plural_noun = noun + ("es" if noun.endswith(("s", "sh", "ch", "x", "z")) else "s")
    return f"{count} {plural_noun}"
