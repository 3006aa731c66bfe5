"""run.py's reader: lines and carriage-return frames, fed from real pipes.

A writer thread stands in for the tool (unit tests spawn no process); the
process-based check is tests/integration/test_run_frames.py.
"""

from __future__ import annotations

import os
import threading

import pytest

from vmbuild.run import FrameSplitter, read_frames


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.frames: list[str] = []
        self.got_frame = threading.Event()

    def line(self, text: str) -> None:
        self.lines.append(text)

    def frame(self, text: str) -> None:
        self.frames.append(text)
        self.got_frame.set()


def split(*chunks: bytes) -> Recorder:
    rec = Recorder()
    splitter = FrameSplitter(rec.line, rec.frame)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.close()
    return rec


QEMU_IMG = b"    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n"


def test_qemu_img_frames_each_reach_on_frame_and_only_the_last_is_a_line() -> None:
    rec = split(QEMU_IMG)
    assert rec.frames == ["    (0.00/100%)", "    (50.00/100%)", "    (100.00/100%)"]
    assert rec.lines == ["    (100.00/100%)"]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_cut_of_the_stream_gives_the_same_lines_and_frames(size: int) -> None:
    # A `\r\n` may be split across two reads: the frame then the line, never twice.
    data = b"start\n" + QEMU_IMG + b"done\r\nbye"
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    rec = split(*chunks)
    assert rec.lines == ["start", "    (100.00/100%)", "done", "bye"]
    assert rec.frames == ["    (0.00/100%)", "    (50.00/100%)", "    (100.00/100%)", "done"]


def test_apt_redraws_are_not_glued_and_a_cleared_line_is_dropped() -> None:
    # apt: frames start with `\r`, the line is blanked, then the next message.
    rec = split(b"\r0% [Working]\r50% [1 nginx]\r             \rGet:2 http://x nginx\nDone.\n")
    assert rec.frames == ["0% [Working]", "50% [1 nginx]"]
    assert rec.lines == ["Get:2 http://x nginx", "Done."]


def test_a_redraw_cut_off_by_eof_leaves_its_last_frame_as_a_line() -> None:
    assert split(b"a\n12%\r47%\r").lines == ["a", "47%"]
    assert split(b"").lines == []
    assert split(b"\n\n").lines == ["", ""]


def test_utf8_split_across_reads_is_decoded_whole() -> None:
    data = "größe ✓\r".encode()
    rec = split(data[:3], data[3:8], data[8:])
    assert rec.frames == ["größe ✓"] and rec.lines == ["größe ✓"]


def test_a_frame_is_handed_over_while_the_writer_still_holds_the_line() -> None:
    r, w = os.pipe()
    rec = Recorder()
    raw: list[bytes] = []
    stream = os.fdopen(r, "rb", buffering=0)
    reader = threading.Thread(
        target=read_frames, args=(stream, FrameSplitter(rec.line, rec.frame), raw.append)
    )
    reader.start()
    try:
        os.write(w, b"    (0.00/100%)\r")
        # No newline yet: a line reader would still be waiting here.
        assert rec.got_frame.wait(10), "the frame did not arrive before the newline"
        assert rec.frames == ["    (0.00/100%)"] and rec.lines == []
        rec.got_frame.clear()
        os.write(w, b"    (100.00/100%)\r")
        assert rec.got_frame.wait(10)
        os.write(w, b"\n")
    finally:
        os.close(w)
        reader.join(10)
    stream.close()
    assert not reader.is_alive()
    assert rec.lines == ["    (100.00/100%)"]
    assert b"".join(raw) == b"    (0.00/100%)\r    (100.00/100%)\r\n"


def test_qemu_img_frames_as_bytes_of_the_virtual_size() -> None:
    from vmbuild.stages.convert import progress_bytes

    total = 4 << 30
    assert progress_bytes("    (0.00/100%)", total) == 0
    assert progress_bytes("    (25.00/100%)", total) == 1 << 30
    assert progress_bytes("    (100.00/100%)", total) == total
    assert progress_bytes("qemu-img: warning: something", total) is None
