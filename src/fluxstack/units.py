"""Byte and rate formatting for human output."""


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1000' -> bytes (binary units; a bare number is bytes)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 1000, 512MiB, 2GiB)") from None
