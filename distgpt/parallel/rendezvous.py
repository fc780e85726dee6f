"""Ranks that find each other without MPI: a small key-value store every rank can reach, and the
control messages the trainer needs over it (who is who, rank 0's NCCL id, barriers, small
objects). The bytes of the training step never pass here: they go over NCCL (GPUs) or, on
CPUs, through StoreComm (tests and debugging, not speed).

Two stores, picked by `rendezvous=`:
- `file:DIR` — a directory every rank sees (a shared filesystem, or /tmp on one machine). A key
  is a file, written to a temporary name and renamed, so a reader never sees half a value.
  Files outlive the job, so keys carry the launch's id (SLURM_JOB_ID and its restart count,
  or DISTGPT_RUN_ID): a requeued or repeated job never reads an earlier one's values.
- `tcp:HOST:PORT` — rank 0 serves the store from a thread on PORT (HOST is rank 0's address as
  the others reach it); each request is one JSON line over a fresh connection, and a `get` waits
  on the server until the key is set. Nothing is left behind.

Values are JSON (strings, numbers, lists): no pickles, so a store reachable by others cannot
make a rank run code. Every wait ends after `timeout_s` with one line naming the rank and the
key, so a rank that never started does not hang the others forever.
"""
import json
import os
import socket
import socketserver
import threading
import time
from pathlib import Path

POLL_S = (0.005, 0.1)  # file store: first and longest pause between looks for a key


class RendezvousError(RuntimeError):
    """The store cannot be reached or a rank did not arrive; the message is one line."""


def parse(spec):
    """'file:DIR' -> ('file', DIR); 'tcp:HOST:PORT' -> ('tcp', (HOST, PORT)). Raises ValueError
    with a one-line reason for anything else."""
    kind, _, rest = spec.partition(":")
    if kind == "file" and rest:
        return "file", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host, int(port))
    raise ValueError(f"rendezvous={spec!r}: use file:DIR (a directory every rank sees) or "
                     f"tcp:HOST:PORT (rank 0's address and a free port)")


def launch_id(environ=os.environ):
    """What keeps one launch's file-store keys apart from another's, or None."""
    if environ.get("DISTGPT_RUN_ID"):
        return environ["DISTGPT_RUN_ID"]
    if environ.get("SLURM_JOB_ID"):
        return f"slurm-{environ['SLURM_JOB_ID']}-{environ.get('SLURM_RESTART_COUNT', '0')}"
    return None


def open_store(spec, rank, timeout_s, environ=os.environ):
    kind, where = parse(spec)
    if kind == "file":
        run = launch_id(environ)
        if run is None:
            raise RendezvousError(f"rendezvous={spec}: a file store needs an id unique to this launch, to "
                                  f"keep it apart from earlier ones in {where}: set DISTGPT_RUN_ID (Slurm "
                                  f"sets SLURM_JOB_ID), or use tcp:HOST:PORT")
        return FileStore(Path(where) / run, rank, timeout_s)
    return TcpStore(*where, rank, timeout_s)


class FileStore:
    def __init__(self, directory, rank, timeout_s):
        self.directory, self.rank, self.timeout_s = Path(directory), rank, timeout_s
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RendezvousError(f"rank {rank}: cannot use rendezvous directory {self.directory}: "
                                  f"{exc.strerror}") from None

    def _path(self, key):
        return self.directory / key.replace("/", "_")

    def set(self, key, value):
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{self.rank}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)

    def get(self, key):
        path, pause = self._path(key), POLL_S[0]
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise _timed_out(self.rank, key, self.timeout_s) from None
                time.sleep(pause)
                pause = min(2 * pause, POLL_S[1])

    def close(self):
        pass


def _timed_out(rank, key, timeout_s):
    return RendezvousError(f"rank {rank}: rendezvous: '{key}' did not arrive within comm_timeout_s="
                           f"{timeout_s:g} s (another rank did not start, or died); check that every "
                           f"rank got the same rendezvous= and RANK/WORLD_SIZE")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port):
        super().__init__(("", port), _Handler)
        self.values, self.changed = {}, threading.Condition()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        request = json.loads(self.rfile.readline())
        store = self.server
        with store.changed:
            if request["op"] == "set":
                store.values[request["key"]] = request["value"]
                store.changed.notify_all()
                reply = {"ok": True}
            else:
                found = store.changed.wait_for(lambda: request["key"] in store.values, request["timeout"])
                reply = {"value": store.values[request["key"]]} if found else {"timeout": True}
        self.wfile.write((json.dumps(reply) + "\n").encode())


class TcpStore:
    def __init__(self, host, port, rank, timeout_s):
        self.address, self.rank, self.timeout_s = (host, port), rank, timeout_s
        self.server = None
        if rank == 0:
            try:
                self.server = _Server(port)
            except OSError as exc:
                raise RendezvousError(f"rank 0: rendezvous tcp: cannot listen on port {port}: {exc.strerror}; "
                                      f"pick a free port") from None
            threading.Thread(target=self.server.serve_forever, daemon=True, name="rendezvous").start()

    def _request(self, request, key):
        """One request over a fresh connection; connecting is retried until rank 0 listens."""
        deadline = time.monotonic() + self.timeout_s
        pause = POLL_S[0]
        while True:
            try:
                with socket.create_connection(self.address, timeout=self.timeout_s + 5) as sock:
                    sock.sendall((json.dumps(request) + "\n").encode())
                    reply = json.loads(sock.makefile().readline())
                break
            except OSError as exc:  # refused, unresolvable, timed out: all OSErrors
                if time.monotonic() > deadline:
                    raise RendezvousError(f"rank {self.rank}: rendezvous tcp:{self.address[0]}:{self.address[1]} "
                                          f"unreachable ({exc.__class__.__name__}); is rank 0 running, and is "
                                          f"HOST rank 0's address as this node sees it?") from None
                time.sleep(pause)
                pause = min(2 * pause, POLL_S[1])
        if reply.get("timeout"):
            raise _timed_out(self.rank, key, self.timeout_s)
        return reply

    def set(self, key, value):
        self._request({"op": "set", "key": key, "value": value}, key)

    def get(self, key):
        return self._request({"op": "get", "key": key, "timeout": self.timeout_s}, key)["value"]

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class StoreControl:
    """Control messages over a store. Every rank makes the same calls in the same order, so a
    per-call sequence number names each message without any coordination."""

    def __init__(self, store, rank, world):
        self.store, self.rank, self.world = store, rank, world
        self._seq = 0

    def _key(self, kind):
        self._seq += 1
        return f"{kind}/{self._seq}"

    def bcast(self, obj, root=0):
        key = self._key("bcast")
        if self.rank == root:
            self.store.set(key, obj)
            return obj
        return self.store.get(key)

    def allgather(self, obj):
        key = self._key("allgather")
        self.store.set(f"{key}/{self.rank}", obj)
        return [obj if r == self.rank else self.store.get(f"{key}/{r}") for r in range(self.world)]

    def barrier(self):
        """Every rank has arrived, and every rank has seen that: rank 0, which may serve the TCP
        store and close it once past the barrier, leaves only after the others have read what
        they needed from it (with arrival alone, a rank still reading could find it gone)."""
        self.allgather(True)
        key = self._key("left")
        if self.rank != 0:
            self.store.set(f"{key}/{self.rank}", True)
        else:
            for r in range(1, self.world):
                self.store.get(f"{key}/{r}")
