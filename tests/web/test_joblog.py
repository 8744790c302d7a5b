"""Console logs as text for people: CRLF and bare CR become LF, offsets map between the
raw file and the text exactly (for `Range`), and a follower returns each line once."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.web import joblog
from orchestrator.web.joblog import MAX_LINE_BYTES, LineFollower, LogText

# Console bytes: CR, LF, multi-byte UTF-8 (é), an invalid byte and plain letters.
console_bytes = st.lists(st.sampled_from([b"a", b"b", b"\r", b"\n", "é".encode(), b"\xff"]), max_size=60).map(b"".join)


def expected_text(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@settings(max_examples=200, deadline=None)
@given(raw=console_bytes, chunk=st.integers(1, 7), data=st.data())
def test_text_and_offsets_match_a_whole_file_normalisation(tmp_path_factory, raw, chunk, data):
    path = tmp_path_factory.mktemp("log") / "job.console"
    path.write_bytes(raw)
    joblog.CHUNK_BYTES, saved = chunk, joblog.CHUNK_BYTES  # chunk edges in every place
    try:
        text = LogText(path)
        extent = text.measure()
        want = expected_text(raw)
        assert extent.text_size == len(want) and extent.raw_size == len(raw)
        start = data.draw(st.integers(0, len(want)))
        limit = data.draw(st.integers(1, len(want) + 1))
        raw_start = text.raw_offset(start, extent.raw_size)
        assert b"".join(text.text(raw_start, extent.raw_size)) == want[start:]
        assert b"".join(text.text(raw_start, extent.raw_size, limit=limit)) == want[start : start + limit]
    finally:
        joblog.CHUNK_BYTES = saved


@settings(max_examples=200, deadline=None)
@given(raw=console_bytes, reads=st.lists(st.integers(1, 9), max_size=40))
def test_follower_returns_every_line_once_whatever_the_read_sizes(tmp_path_factory, raw, reads):
    path = tmp_path_factory.mktemp("log") / "job.console"
    path.write_bytes(raw)
    follower = LineFollower(path)
    lines = [line for size in reads for line in follower.read_lines(size)]
    lines += follower.finish()
    want = expected_text(raw).decode("utf-8", errors="replace").split("\n")
    if not raw or expected_text(raw).endswith(b"\n"):
        want.pop()
    assert lines == want
    assert follower.offset == len(raw)


def test_follower_resumes_after_the_last_line_it_returned(tmp_path: Path):
    path = tmp_path / "job.console"
    path.write_bytes(b"one\r\ntwo\r\nthr")
    first = LineFollower(path)
    assert first.read_lines() == ["one", "two"]
    with path.open("ab") as console:
        console.write(b"ee\r\nfour")
    again = LineFollower(path, first.offset)  # a reader reconnecting with Last-Event-ID
    assert again.read_lines() == ["three"]
    assert again.finish() == ["four"]


def test_a_cr_at_the_end_waits_for_its_lf(tmp_path: Path):
    path = tmp_path / "job.console"
    path.write_bytes(b"half\r")
    follower = LineFollower(path)
    assert follower.read_lines() == []
    with path.open("ab") as console:
        console.write(b"\nnext\n")
    assert follower.read_lines() == ["half", "next"]


def test_a_very_long_line_comes_in_pieces_without_splitting_a_character(tmp_path: Path):
    path = tmp_path / "job.console"
    path.write_bytes("é".encode() * MAX_LINE_BYTES)  # no line end, twice the piece size
    follower = LineFollower(path)
    pieces = follower.read_lines()
    assert pieces and all(len(piece.encode()) <= MAX_LINE_BYTES for piece in pieces)
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces + follower.finish()) == "é" * MAX_LINE_BYTES


@settings(max_examples=150, deadline=None)
@given(raw=console_bytes)
def test_each_line_carries_the_offset_a_reader_resumes_from(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("log") / "job.console"
    path.write_bytes(raw)
    follower, marked = LineFollower(path), []
    while True:  # the whole file, as a stream of a finished job reads it
        before = follower.offset
        marked += follower.read_marked_lines(final=True)
        if follower.offset == before:
            break
    for index, (_, offset) in enumerate(marked):
        rest = LineFollower(path, offset).finish()
        assert rest == [line for line, _ in marked[index + 1 :]], (raw, index, offset)
