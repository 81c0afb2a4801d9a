"""Kubernetes resource quantities ("10Gi", "1.5G", "500M") as integer bytes."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "m": Decimal("0.001"), "": 1,
}
GiB = 2**30
MiB = 2**20


def parse_bytes(quantity: str | int) -> int:
    """Bytes in a quantity, rounded up to a whole byte; ValueError when it is not one."""
    if isinstance(quantity, int):
        return quantity
    text = quantity.strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number, factor = text[: -len(suffix)], _SUFFIXES[suffix]
            break
    else:
        number, factor = text, 1
    try:
        value = Decimal(number) * Decimal(factor)
    except InvalidOperation:
        raise ValueError(f"not a quantity: {quantity!r}") from None
    whole = int(value.to_integral_value(rounding="ROUND_CEILING"))
    return whole


def format_bytes(n: int) -> str:
    """Short binary rendering for printer columns: 1.5Gi, 200Mi."""
    for unit, size in (("Ti", 2**40), ("Gi", GiB), ("Mi", MiB), ("Ki", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}"


def exact_quantity(n: int) -> str:
    """The largest binary suffix that renders n exactly (1073741824 -> 1Gi, 1000 -> 1000)."""
    for unit, size in (("Ti", 2**40), ("Gi", GiB), ("Mi", MiB), ("Ki", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
