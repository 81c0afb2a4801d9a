"""Kubernetes resource quantities ("10Gi", "1.5G", "500M") as integer bytes.

Parsing follows the apiserver's grammar exactly (resource.ParseQuantity): everything the API
accepts parses here, and nothing else does, so a value the CRD let through can never crash a
handler and a malformed one is a ValueError, never an OverflowError or a decimal trap.
"""
from __future__ import annotations

import re
from decimal import Decimal, localcontext

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "m": Decimal("0.001"), "u": Decimal("0.000001"), "n": Decimal("0.000000001"), "": 1,
}
# <sign><digits>[.<digits>] then a binary/decimal SI suffix or an e/E exponent (as the apiserver reads it).
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?|[eE](?P<exponent>[+-]?[0-9]+))"
)
# Larger exponents than this are no byte count anything could hold (int64 tops out near 9.2e18).
_MAX_EXPONENT = 64
GiB = 2**30
MiB = 2**20


def parse_bytes(quantity: str | int) -> int:
    """Bytes in a quantity, rounded up to a whole byte; ValueError when it is not one."""
    if isinstance(quantity, bool):
        raise ValueError(f"not a quantity: {quantity!r}")
    if isinstance(quantity, int):
        return quantity
    if not isinstance(quantity, str):
        raise ValueError(f"not a quantity: {quantity!r}")
    match = _QUANTITY.fullmatch(quantity.strip())
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    number = Decimal(match["number"])
    if match["exponent"] is not None:
        exponent = int(match["exponent"])
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"quantity {quantity!r} is out of range")
        factor: int | Decimal = Decimal(10) ** exponent
    else:
        factor = _SUFFIXES[match["suffix"] or ""]
    with localcontext() as ctx:
        ctx.prec = 200  # exact for any digits the API accepts; no rounding before the ceiling
        value = number * Decimal(factor)
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
