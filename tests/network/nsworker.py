"""A worker process that runs functions inside a test network namespace.

Started by `tests.network.conftest.Netns` as
``ip netns exec NS python -m tests.network.nsworker HOST_NETNS_INODE``. It reads pickled
``(function, args, kwargs)`` frames on stdin and answers each with a pickled
``("ok", result)`` or ``("err", exception)`` frame on stdout, so a test can
call the library under test as if in-process while every host change lands in
the namespace. It refuses to run in the test runner's own network namespace
(whose inode it is given).
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Any, BinaryIO


def read_frame(stream: BinaryIO) -> Any:
    header = stream.read(4)
    if len(header) < 4:
        raise EOFError
    (size,) = struct.unpack("!I", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def write_frame(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def main() -> int:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply stream
    if netns_inode() == int(sys.argv[1]):
        write_frame(replies, ("err", RuntimeError("nsworker refuses the host's network namespace")))
        return 1
    write_frame(replies, ("ok", os.getpid()))
    while True:
        try:
            func, args, kwargs = read_frame(requests)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = ("ok", func(*args, **kwargs))
        except Exception as exc:
            reply = ("err", exc)
        try:
            write_frame(replies, reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            write_frame(replies, ("err", RuntimeError(repr(reply[1]))))


if __name__ == "__main__":
    sys.exit(main())
