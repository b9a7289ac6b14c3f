"""Reading what is left of a truncated MCAP file (a recording cut off: no summary, no footer).

rosbags reads an MCAP file without a summary section (it scans the records), but not one without
its footer ("File end magic is invalid"). ``readable_copy`` writes the complete records of the
damaged file to a new one and ends it properly (DataEnd, a footer without summary, the magic), so
rosbags reads it as usual. A chunk cut off part-way keeps the complete records inside it when it
is uncompressed (the rosbag2 default); a compressed chunk cut off is lost. Nothing else is
guessed: the damage (bytes and records kept, bytes lost) is returned for the report.
"""

from __future__ import annotations

import mmap
import shutil
import struct
from pathlib import Path

MAGIC = b"\x89MCAP0\r\n"
_CHUNK, _DATA_END, _FOOTER = 0x06, 0x0F, 0x02
_RECORD = struct.Struct("<BQ")  # opcode, content length


def _complete_records(data: memoryview, start: int, end: int) -> int:
    """Offset after the last complete record of ``data[start:end]``."""
    off = start
    while off + _RECORD.size <= end:
        _, length = _RECORD.unpack_from(data, off)
        if off + _RECORD.size + length > end:
            break
        off += _RECORD.size + length
    return off


def _salvage_chunk(data: memoryview, off: int) -> bytes:
    """The complete inner records of an uncompressed chunk record cut off at the end of
    ``data`` (b"" when compressed or too short to tell)."""
    head = off + _RECORD.size + 28  # start and end time, uncompressed size and crc
    if head + 4 > len(data):
        return b""
    (name_len,) = struct.unpack_from("<I", data, head)
    records = head + 4 + name_len + 8
    if name_len or records > len(data):  # a compression name: cannot cut its stream safely
        return b""
    return bytes(data[records:_complete_records(data, records, len(data))])


def readable_copy(src: Path, dst: Path) -> str:
    """Write the readable part of MCAP file ``src`` to ``dst``; returns what was lost.

    Raises:
        ValueError: ``src`` does not start like an MCAP file.
    """
    if src.stat().st_size < len(MAGIC):
        raise ValueError("not an MCAP file (shorter than its magic)")
    with src.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)  # no copy in memory: bags can be large
        try:
            return _copy(view, dst)
        finally:
            view.release()


def _copy(data: memoryview, dst: Path) -> str:
    if bytes(data[:8]) != MAGIC:
        raise ValueError("not an MCAP file (no magic at its start)")
    off = len(MAGIC)
    while off + _RECORD.size <= len(data):  # the data section, up to DataEnd or the damage
        op, length = _RECORD.unpack_from(data, off)
        if op in (_DATA_END, _FOOTER) or off + _RECORD.size + length > len(data):
            break
        off += _RECORD.size + length
    complete = off
    op = data[off] if off < len(data) else None
    salvaged = _salvage_chunk(data, off) if op == _CHUNK else b""
    with dst.open("wb") as out:
        out.write(data[:complete])
        out.write(salvaged)
        out.write(_RECORD.pack(_DATA_END, 4) + bytes(4))  # DataEnd, no CRC
        out.write(_RECORD.pack(_FOOTER, 20) + bytes(20))  # footer: no summary section
        out.write(MAGIC)
    kept = complete + len(salvaged)
    lost = len(data) - kept
    chunk = (f", {len(salvaged)} bytes of it from a chunk cut off part-way" if salvaged else
             ", a compressed chunk cut off part-way is lost" if op == _CHUNK else "")
    return f"truncated MCAP: read the first {kept} of {len(data)} bytes{chunk}; {lost} bytes lost"


def readable_bag(bag: Path, tmp: Path) -> tuple[Path, str]:
    """A readable copy (in ``tmp``) of a rosbag2 folder or bare ``.mcap`` whose MCAP files
    are cut off; returns (path to open, what was lost)."""
    if bag.is_file():
        out = tmp / bag.name
        return out, readable_copy(bag, out)
    out = tmp / bag.name
    out.mkdir()
    notes = []
    for path in sorted(p for p in bag.iterdir() if p.is_file()):
        if path.suffix == ".mcap" and not is_complete(path):
            notes.append(f"{path.name}: {readable_copy(path, out / path.name)}")
        else:
            shutil.copy2(path, out / path.name)
    return out, "; ".join(notes)


def is_complete(path: Path) -> bool:
    """Whether an MCAP file ends with its magic (a recording that was closed)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        if f.tell() < 2 * len(MAGIC):
            return False
        f.seek(-len(MAGIC), 2)
        return f.read() == MAGIC
