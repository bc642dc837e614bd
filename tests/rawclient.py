"""A client of the bare frames, with the standard library only, for tests that must
connect as another user (who may be unable to run this venv's Python).

    rawclient.py hold SOCKET COUNT FRAMES   COUNT connections each send FRAMES (a file
                                            of whole frames) and never read; "ready" on
                                            stdout; all close when stdin does
    rawclient.py flood SOCKET COUNT SECONDS COUNT connections, each announcing a 16 MiB
                                            frame and sending it a byte at a time, again
                                            and again, for SECONDS
    rawclient.py call SOCKET FRAMES         send FRAMES, write the body of the first
                                            reply frame to stdout and the seconds it took
                                            to stderr
"""

import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct(">I")


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(path)
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def hold(path: str, count: int, frames: bytes) -> None:
    socks = []
    for _ in range(count):
        sock = connect(path)
        sock.sendall(frames)
        socks.append(sock)
    print("ready", flush=True)
    sys.stdin.read()


def flood(path: str, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds

    def one() -> None:
        while time.monotonic() < deadline:
            try:
                with connect(path) as sock:
                    sock.sendall(HEADER.pack(16 * 1024 * 1024))
                    while time.monotonic() < deadline:
                        sock.sendall(b"x")
                        time.sleep(0.05)
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    for thread in threads:
        thread.join()


def call(path: str, frames: bytes) -> None:
    started = time.monotonic()
    with connect(path) as sock:
        sock.sendall(frames)
        (length,) = HEADER.unpack(read_exactly(sock, HEADER.size))
        body = read_exactly(sock, length)
    sys.stderr.write(f"{time.monotonic() - started:.3f}\n")
    sys.stdout.buffer.write(body)


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "hold":
        with open(sys.argv[4], "rb") as f:
            hold(path, int(sys.argv[3]), f.read())
    elif mode == "flood":
        flood(path, int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "call":
        with open(sys.argv[3], "rb") as f:
            call(path, f.read())
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
