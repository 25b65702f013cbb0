"""`concord serve --workers N`: N server processes over one store, the parent dealing out the connections.

The parent holds the listening socket and hands each connection it accepts to the next ready worker in turn,
over a Unix socket pair (SCM_RIGHTS). With one listening socket shared instead, the worker that wakes first takes
every connection of a burst: 8 keep-alive clients landed 8/0, 6/2 or 4/4 on two workers from run to run, and the
8/0 runs searched at a third of the 4/4 rate. Each worker opens the store shared (`GalleryStore(shared=True)`) and
tells the parent when it is ready; one that dies is started again while the others go on answering, and SIGINT or
SIGTERM stops them all gracefully (each saves its index).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from server.settings import Settings

log = logging.getLogger("concord.server")
READY = b"r"
BACKLOG = 2048
"""Connections the kernel queues while the workers start (uvicorn's own default)."""
STOP_WAIT_S = 30.0
"""Seconds a worker has to shut down gracefully after SIGTERM before it is killed."""
EARLY_DEATHS = 3
"""Workers in a row that may die before they are ready (a store another process took, say) before the server
gives up instead of starting more. Until some worker has been ready, one is enough (none is ready either); once
one has (so workers can start), a replacement that dies while it starts is started again even when no worker is
ready then. A worker killed by SIGKILL never counts: that came from outside, not from the worker."""


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim; elsewhere a no-op)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class WorkerServer(uvicorn.Server):
    """uvicorn serving the connections its parent sends over `channel` instead of accepting its own."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self._handing: set[asyncio.Task[object]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        channel = self.channel
        channel.setblocking(False)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._receive)
        channel.sendall(READY)

    def _receive(self) -> None:
        """Take the connections the parent sent; the parent's end closing means it is gone: stop."""
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, 64, 64)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.should_exit = True
            return
        loop = asyncio.get_running_loop()
        for fd in fds:
            conn = socket.socket(fileno=fd)
            conn.setblocking(False)
            task: asyncio.Task[object] = loop.create_task(loop.connect_accepted_socket(self._protocol, conn))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    def _protocol(self) -> asyncio.Protocol:
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state)
        return protocol


def run_worker(settings: Settings, channel: socket.socket) -> None:
    """A worker process: the app over the shared store, served on the connections the parent sends."""
    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(create_app(settings, shared=True), log_level=settings.log_level,
                            timeout_graceful_shutdown=10)
    WorkerServer(config, channel).run()


@dataclass
class Worker:
    """The parent's view of one worker: its process, its end of the channel, whether it said it is ready, and
    whether it still takes connections (a send to it failed: it died, and is replaced on the next round)."""

    process: BaseProcess
    channel: socket.socket
    ready: bool = False
    lost: bool = False
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts `count` workers, accepts on `listener` once all are ready, deals out connections in turn, restarts a
    worker that dies, and stops them all on SIGINT/SIGTERM."""

    def __init__(self, settings: Settings, listener: socket.socket, count: int,
                 target: Callable[[Settings, socket.socket], None] = run_worker) -> None:
        """`target` runs in each worker process (tests give their own; it must be importable by name)."""
        self.settings, self.listener, self.count, self.target = settings, listener, count, target
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[Worker] = []
        self._selector = selectors.DefaultSelector()
        self._turn = 0
        self._early_deaths = 0
        self._serving = False
        self._proven = False
        """Whether some worker has been ready: workers can start, so one dying while it starts is started again."""
        self._stopping = False

    def run(self) -> None:
        """Serve until a signal asks to stop (or no worker could start)."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.listener.listen(BACKLOG)
        self.listener.setblocking(False)
        self._workers = [self._start() for _ in range(self.count)]
        try:
            while not self._stopping:
                for key, _ in self._selector.select(timeout=0.5):
                    if key.fileobj is self.listener:
                        self._deal()
                    else:
                        self._heard(key.data)
                self._replace_dead()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self) -> Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = self._context.Process(target=self.target, args=(self.settings, theirs), name="concord-worker")
        process.start()
        theirs.close()
        mine.setblocking(False)
        worker = Worker(process, mine)
        self._selector.register(mine, selectors.EVENT_READ, worker)
        return worker

    def _heard(self, worker: Worker) -> None:
        """A worker said it is ready (or closed its end by dying); accept once every worker is ready at first, and
        again whenever one is after none could take connections."""
        try:
            data = worker.channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if READY in data and not worker.ready:
            worker.ready, self._proven, self._early_deaths = True, True, 0
            log.info("worker %s ready in %.1f s", worker.process.pid, time.monotonic() - worker.started)
            if self._serving or all(w.ready for w in self._workers):
                self._serving = True
                self._listen()
        elif not data:
            self._selector.unregister(worker.channel)

    def _listen(self) -> None:
        try:
            self._selector.get_key(self.listener)
        except KeyError:
            self._selector.register(self.listener, selectors.EVENT_READ, None)
            log.info("%d workers serving on %s:%s", len(self._workers), self.settings.host, self.settings.port)

    def _deal(self) -> None:
        """Hand every waiting connection to the next ready worker in turn; while none is, leave them queued in the
        kernel (stop accepting until one says it is ready)."""
        while True:
            if not any(w.ready and not w.lost for w in self._workers):
                self._selector.unregister(self.listener)
                return
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            with conn:
                for _ in range(len(self._workers)):
                    worker = self._workers[self._turn % len(self._workers)]
                    self._turn += 1
                    if worker.ready and not worker.lost:
                        try:
                            socket.send_fds(worker.channel, [b"c"], [conn.fileno()])
                            break
                        except BlockingIOError:  # this worker has thousands waiting already: the next one
                            continue
                        except OSError:
                            worker.lost = True

    def _replace_dead(self) -> None:
        for i, worker in enumerate(self._workers):
            if worker.process.exitcode is None or self._stopping:
                continue
            killed = worker.process.exitcode == -signal.SIGKILL  # from outside (the OOM killer, an operator)
            if not worker.ready and not killed:  # no worker ever ready and one such death: none can start
                self._early_deaths += 1
                if self._early_deaths >= EARLY_DEATHS or not self._proven:  # a ready worker has proven it
                    log.error("a worker exited with code %s before it was ready; stopping (see its log above)",
                              worker.process.exitcode)
                    self._stopping = True
                    return
            log.warning("worker %s exited with code %s; starting another", worker.process.pid,
                        worker.process.exitcode)
            self._drop(worker)
            self._workers[i] = self._start()

    def _drop(self, worker: Worker) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.channel)
        worker.channel.close()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _stop_all(self) -> None:
        """SIGTERM every worker (uvicorn's graceful shutdown closes its store), then wait; kill what lingers."""
        for worker in self._workers:
            if worker.process.exitcode is None and worker.process.pid is not None:
                worker.process.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            self._drop(worker)
        self.listener.close()
