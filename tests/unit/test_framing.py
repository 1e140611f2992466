"""Framing both ways: the worker's lease reader and the coordinator's answer splitter give the
frames as written, whatever each read hands over."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator

import pytest

from procdispatch import _protocol as proto


class Pipe:
    """A pipe whose writing end the test closes once, when it is done writing."""

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        self._writer: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        """Write ``data`` from a thread (a pipe holds 64 KiB: a larger write blocks until it
        is read), then close the writing end."""

        def run() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._w, view) :]
            os.close(self._w)

        self._writer = threading.Thread(target=run, daemon=True)
        self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.join(20)
            assert not self._writer.is_alive(), "the writer is stuck"
        os.close(self.r)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


def test_frames_written_together_come_out_one_per_read_call(pipe):
    bodies = [b"L" + bytes([i]) * i for i in range(1, 40)]
    pipe.write(b"".join(proto.frame(b)[0] for b in bodies))  # one write: one read takes all
    reader = proto.FrameReader(pipe.r)
    assert [bytes(reader.read() or b"") for _ in bodies] == bodies
    assert reader.read() is None


@pytest.mark.parametrize("before", [0, 3])
def test_a_frame_larger_than_one_read_arrives_whole(pipe, before):
    """Its head may come in the same read as small frames before it."""
    small = [b"s" * 10] * before
    big = bytes(range(256)) * 1000  # 256,000 bytes: several reads' worth
    pipe.write(b"".join(b"".join(proto.frame(b)) for b in [*small, big, b"after"]))
    reader = proto.FrameReader(pipe.r)
    got = [reader.read() for _ in range(before + 2)]
    assert got == [*small, big, b"after"]
    assert isinstance(got[before], bytearray)  # read into its own buffer
    assert reader.read() is None


def test_a_frame_with_the_long_size_header_is_read_whole(pipe):
    body = b"x" * 100_000
    pipe.write(proto.SIZE.pack(-1) + proto.BIG.pack(len(body)) + body)
    reader = proto.FrameReader(pipe.r)
    assert reader.read() == body
    assert reader.read() is None


@pytest.mark.parametrize("size", [10, 100_000])
def test_the_end_of_the_pipe_inside_a_frame_is_the_end(pipe, size):
    pipe.write(proto.SIZE.pack(size) + b"y" * (size // 2))
    assert proto.FrameReader(pipe.r).read() is None


def _answers() -> tuple[bytes, list[tuple[str, int, int]]]:
    """A worker's answers, framed one after another, and what each says."""
    bodies = [
        proto.encode_ready(4242),
        proto.encode_done(1, 1, 0.25),
        proto.encode_done(2, 1, 0.5),
        proto.encode_result(proto.Failed(3, 2, ValueError("no"), [0], None, False, None)),
        proto.encode_done(4, 3, float("inf")),
        proto.encode_done(5, 1, 1e-6),
    ]
    said = [("Ready", 4242, 0), ("Done", 1, 1), ("Done", 2, 1), ("Failed", 3, 2)]
    said += [("Done", 4, 3), ("Done", 5, 1)]
    return b"".join(b"".join(proto.frame(b)) for b in bodies), said


def _what(m: proto.WorkerMessage) -> tuple[str, int, int]:
    if isinstance(m, proto.Ready):
        return ("Ready", m.pid, 0)
    assert isinstance(m, (proto.Done, proto.Failed))
    return (type(m).__name__, m.batch_id, m.attempt)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 7, 25, 26, 27, 1000])
def test_answers_come_out_whole_however_the_reads_cut_them(cut):
    """Done frames are decoded where they lie in what was read; any frame cut by the end of
    a read waits for the rest."""
    stream, said = _answers()
    splitter = proto.FrameSplitter()
    got: list[proto.WorkerMessage] = []
    for at in range(0, len(stream), cut):
        got.extend(splitter.messages(stream[at : at + cut]))
    assert [_what(m) for m in got] == said
    seconds = [m.seconds for m in got if isinstance(m, proto.Done)]
    assert seconds == [0.25, 0.5, float("inf"), 1e-6]
    (failed,) = [m for m in got if isinstance(m, proto.Failed)]
    assert isinstance(failed.error, ValueError)
    assert failed.kept == [0]


def _log_body(size: int) -> tuple[bytes, dict[str, int]]:
    """A log record's frame body of exactly ``size`` bytes, and its attributes."""
    for k in range(1, 200):
        attrs = {"m" * k: k}
        body = proto.encode_log(pickle.dumps(attrs, 5))
        if len(body) == size:
            return body, attrs
    raise AssertionError(f"no log body of {size} bytes")


@pytest.mark.parametrize("cut", [None, 26, 52])
def test_done_frames_decoded_whole_stop_at_the_first_other_frame(cut):
    """A read that is whole frames of a Done's size is decoded as Dones up to the first frame
    that is not one, even one of a Done's size (a log record of 22 bytes), and read on from
    there."""
    log_body, attrs = _log_body(proto.DONE.size)
    bodies = [
        proto.encode_done(1, 1, 0.5),
        proto.encode_done(2, 1, 0.5),
        log_body,
        proto.encode_done(3, 2, 0.25),
        proto.encode_ready(7),
        proto.encode_done(4, 1, 0.125),
    ]
    stream = b"".join(b"".join(proto.frame(b)) for b in bodies)
    splitter = proto.FrameSplitter()
    got: list[proto.WorkerMessage] = []
    step = cut or len(stream)
    for at in range(0, len(stream), step):
        got.extend(splitter.messages(stream[at : at + step]))
    assert [type(m).__name__ for m in got] == ["Done", "Done", "Log", "Done", "Ready", "Done"]
    dones = [(m.batch_id, m.attempt, m.seconds) for m in got if isinstance(m, proto.Done)]
    assert dones == [(1, 1, 0.5), (2, 1, 0.5), (3, 2, 0.25), (4, 1, 0.125)]
    log = got[2]
    assert isinstance(log, proto.Log)
    assert log.attrs == attrs


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 17, 40, 41, 42, 82, 1000])
def test_lease_frames_come_out_whole_however_the_reads_cut_them(cut):
    """The lease reader's splitter: frames cut by the end of a read wait for their rest;
    whole ones come out as bytes, equal to what was framed."""
    bodies = [b"L" + bytes([i % 251]) * (i * 7 % 60) for i in range(1, 60)]
    stream = b"".join(proto.frame(b)[0] for b in bodies)
    splitter = proto.FrameSplitter()
    got: list[bytes] = []
    for at in range(0, len(stream), cut):
        got.extend(splitter.split(stream[at : at + cut]))
    assert got == bodies
    assert all(type(b) is bytes for b in got)
    assert not splitter._buf  # nothing left over
