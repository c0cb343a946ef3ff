"""Damage a file on disk the way a crash or a bad disk would, for the tests that check a
damaged checkpoint is named before anything is read from it."""

from pathlib import Path


def truncate(path: Path) -> None:
    """Keep the first half of the file (a write cut short)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of the file (same size, other checksum)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
