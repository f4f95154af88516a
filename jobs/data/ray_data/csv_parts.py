"""Where a CSV file can be cut into parts that pandas reads one at a time, and the row numbers pandas gives them.

A byte range cannot tell where a CSV row starts: a quoted cell may hold a line end. No maintained library gives the
byte offsets of a CSV file's records (pandas' and pyarrow's readers parse a whole stream), so one pass over the
file's quotes and line ends finds them, with pandas' rules (quotes open a cell only at its start, "" is a quote
inside one, \\n, \\r\\n and a lone \\r end a line, blank and whitespace-only lines are skipped). Each part then starts on
a record, is read with the file's header line in front, and numbers its rows from the count of the records before it.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

QUOTE, COMMA, LF, CR = b'"'[0], b","[0], b"\n"[0], b"\r"[0]
BLANK = b" \t\r"  # pandas' C reader skips a line of these only
CHUNK = 8 << 20


class _Scan:
    """The walk over one file, a chunk at a time: the state it carries from one chunk to the next."""

    def __init__(self, part_bytes: int) -> None:
        self.part_bytes = part_bytes
        self.inside = False  # in a quoted cell
        self.skip = -1  # the second quote of a "" pair, read ahead
        self.before = LF  # the byte before the chunk's first one
        self.record_start = 0
        self.seen_from = 0  # where the record's own bytes start (see _end_record)
        self.record_seen = False  # a byte other than BLANK in the record so far
        self.records = 0  # non-blank records ended: the header and the data rows
        self.header: tuple[int, int] | None = None
        self.part_start = 0
        self.part_first = 1
        self.parts: list[dict[str, int]] = []

    def walk(self, buf: bytes, base: int, limit: int) -> None:
        """The quotes and line ends among buf[:limit], buf starting at byte `base` of the file; buf[limit:] (one byte
        at most) is only looked at, to tell \\r\\n from a lone \\r and "" from a closing quote."""
        data = np.frombuffer(buf, dtype=np.uint8)
        head, after = data[:limit], np.append(data[1:], 0)[:limit]
        ends = (head == LF) | ((head == CR) & (after != LF))
        for p in np.flatnonzero(ends | (head == QUOTE)).tolist():
            at = base + p
            if at < self.skip:
                continue
            if buf[p] == QUOTE:
                self._quote(buf, p, at)
            elif not self.inside:
                self._end_record(buf, base, p)
        if self.record_start < base + limit:  # a record runs on into the next chunk
            self.record_seen |= bool(buf[max(self.seen_from - base, 0) : limit].strip(BLANK))
        self.before = buf[limit - 1] if limit else self.before

    def _quote(self, buf: bytes, p: int, at: int) -> None:
        if self.inside:
            if p + 1 < len(buf) and buf[p + 1] == QUOTE:
                self.skip = at + 2
            else:
                self.inside = False
        elif at == self.record_start or (buf[p - 1] if p else self.before) in (COMMA, LF, CR):
            self.inside = True

    def _end_record(self, buf: bytes, base: int, p: int) -> None:
        end = base + p + 1
        blank = not (self.record_seen or buf[max(self.seen_from - base, 0) : p].strip(BLANK))
        if not blank:
            self.records += 1
            if self.header is None:
                self.header = (self.record_start, end)
        # pandas' reader drops a comma right after a blank line that a lone \r ends (",x" reads as "x"): the next
        # record's bytes start after it, and no part starts on it (read alone, it would keep the comma).
        eaten = blank and buf[p] == CR and p + 1 < len(buf) and buf[p + 1] == COMMA
        self.record_start, self.seen_from, self.record_seen = end, end + eaten, False
        if self.header is not None and end - self.part_start >= self.part_bytes and not eaten:
            self._cut(end)

    def _cut(self, end: int) -> None:
        self.parts.append({"start": self.part_start, "end": end, "first_row": self.part_first})
        self.part_start, self.part_first = end, self.records  # the header is not a data row

    def finish(self, size: int) -> None:
        if self.record_start < size and self.record_seen:  # the last line has no line end
            self.records += 1
            self.header = self.header or (self.record_start, size)
        if size > self.part_start or not self.parts:
            self._cut(size)


def record_parts(stream: BinaryIO, part_bytes: int) -> tuple[tuple[int, int] | None, list[dict[str, int]]]:
    """The header line's (start, end) and parts of at least `part_bytes` (the last may be smaller), each {start, end,
    first_row, rows}: whole records, numbered as pandas numbers the data rows (from 1, blank lines not counted)."""
    scan, base, held = _Scan(part_bytes), 0, b""
    while chunk := stream.read(CHUNK):
        buf = held + chunk
        scan.walk(buf, base, len(buf) - 1)
        base, held = base + len(buf) - 1, buf[-1:]
    if held:
        scan.walk(held, base, 1)
    scan.finish(base + len(held))
    rows = scan.records - 1 if scan.header else 0  # the data rows: all records but the header
    for part, next_first in zip(scan.parts, [p["first_row"] for p in scan.parts[1:]] + [rows + 1], strict=True):
        part["rows"] = next_first - part["first_row"]
    return scan.header, scan.parts
