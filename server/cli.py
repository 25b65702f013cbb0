"""`concord serve | migrate | backfill | demo | verify-release | bench`: the server's commands and its benchmarks'.

Heavy imports (FastAPI, onnxruntime, FAISS) happen inside the commands; nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from models.cli import DEFAULT_SERVER, SERVER_HELP, fail

if TYPE_CHECKING:
    from edge.client import ConcordClient
    from server.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _env(name: str, text: str, default: object = None) -> str:
    """Help text that names the option's variable and default in parentheses (rich would eat brackets)."""
    from server.settings import PREFIX, Settings

    shown = default if default is not None else getattr(Settings(), name)
    tail = "" if shown is None else f"; default {shown}"
    return f"{text} (env {PREFIX}{name.upper()}{tail})"


SHIPPED = "the release shipped in the package"


@app.command()
def serve(
    release: Annotated[Path | None, typer.Option(help=_env("release", "Release folder", SHIPPED))] = None,
    data_dir: Annotated[Path | None, typer.Option(help=_env("data_dir", "Store folder"))] = None,
    host: Annotated[str | None, typer.Option(help=_env("host", "Address to bind"))] = None,
    port: Annotated[int | None, typer.Option(help=_env("port", "Port"))] = None,
    api_key: Annotated[str | None, typer.Option(help=_env("api_key", "API key for writes; prefer the variable, a "
                                                          "command line is visible to other users", "none: writes "
                                                          "open"))] = None,
    auth_reads: Annotated[bool | None, typer.Option("--auth-reads/--open-reads", help=_env(
        "auth_reads", "Require the key for reads too", "open reads"))] = None,
    model: Annotated[str | None, typer.Option(help=_env("model", "Cloud model that indexes a NEW store",
                                                        "the newest cloud model"))] = None,
    max_request_bytes: Annotated[int | None, typer.Option(help=_env("max_request_bytes", "Largest request body, "
                                                                    "bytes"))] = None,
    max_request_pixels: Annotated[int | None, typer.Option(help=_env("max_request_pixels", "Pixels of the new "
                                                                     "photos of one upload"))] = None,
    max_metadata_bytes: Annotated[int | None, typer.Option(help=_env("max_metadata_bytes", "JSON bytes of one "
                                                                     "photo's metadata"))] = None,
    keep_bytes: Annotated[bool | None, typer.Option("--keep-bytes/--no-keep-bytes", help=_env(
        "keep_bytes", "Keep photo bytes for later backfills", "keep"))] = None,
    threads: Annotated[int | None, typer.Option(help=_env("threads", "onnxruntime threads per encoder",
                                                          "one per core"))] = None,
    faiss_threads: Annotated[int | None, typer.Option(help=_env("faiss_threads", "FAISS threads per search "
                                                                "(parallel requests use the other cores)"))] = None,
    index_kind: Annotated[str | None, typer.Option("--index", help=_env(
        "index", "FAISS index: flat, hnsw or ivf, with params as in 'hnsw:M=16,ef_search=128'"))] = None,
    gallery: Annotated[str | None, typer.Option(help=_env("gallery", "Gallery backend: embedded, "
                                                          "milvus://host:19530/collection or "
                                                          "milvus-lite:./gallery.db", "embedded"))] = None,
    log_level: Annotated[str | None, typer.Option(help=_env("log_level", "uvicorn log level"))] = None,
    workers: Annotated[int | None, typer.Option(help=_env("workers", "Server processes over one store, e.g. one per "
                                                          "core (each holds its own index and models)"))] = None,
) -> None:
    """Start the photo-search server (FastAPI + uvicorn) with a release and a gallery (embedded or Milvus)."""
    import logging

    import uvicorn

    from models.manifest import ManifestError
    from models.release import ReleaseError
    from server.app import create_app
    from server.opening import check_store_fits
    from server.settings import Settings, SettingsError
    from server.store import store_held
    from server.store.milvus_client import MilvusUnavailable

    try:
        settings = Settings.from_env(release=release, data_dir=data_dir, host=host, port=port, api_key=api_key,
                                     auth_reads=auth_reads, model=model, max_request_bytes=max_request_bytes,
                                     max_request_pixels=max_request_pixels, max_metadata_bytes=max_metadata_bytes,
                                     keep_bytes=keep_bytes, threads=threads, faiss_threads=faiss_threads,
                                     index=index_kind, gallery=gallery, log_level=log_level, workers=workers)
    except SettingsError as err:
        fail(str(err))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (Path(settings.release) / "manifest.json").is_file():
        fail(f"no release at {settings.release} (no manifest.json): pass --release or set CONCORD_RELEASE")
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"concord: warning: serving on {settings.host} with no API key: anyone who reaches it can write",
              file=sys.stderr)
    if store_held(Path(settings.data_dir) / "gallery"):
        fail(f"the store in {settings.data_dir} is held by another process (another concord serve?): stop it, or "
             f"give this server its own --data-dir / CONCORD_DATA_DIR")
    try:
        check_store_fits(settings)
        sock = _listen(settings.host, settings.port)
        if settings.workers > 1:
            _serve_workers(settings, sock)
            return
        config = uvicorn.Config(create_app(settings), log_level=settings.log_level, timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[sock])
    except (ManifestError, ReleaseError, ValueError, MilvusUnavailable) as err:
        fail(str(err))


def _serve_workers(settings: Settings, sock: socket.socket) -> None:
    """`--workers N`: open the service once exclusively (crash recovery, and every refusal in one line), then run N
    worker processes sharing the store, the connections dealt out among them (`server.workers`)."""
    from server.service import Service
    from server.workers import Supervisor, release_freed_memory

    Service.open(settings, resume=False).close()
    release_freed_memory()  # the parent only supervises from here: about 230 -> 110 MB on the shipped release
    Supervisor(settings, sock, settings.workers).run()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn, or a one-line error (a busy port names --port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # the TCP proto: asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is in use (another server?): pass --port or set CONCORD_PORT")
        fail(f"cannot listen on {host}:{port} ({err.strerror}): pass --host / --port")
    return sock


@app.command()
def migrate(
    gallery: Annotated[str, typer.Option(help="The Milvus gallery to fill: milvus://host:19530/collection or "
                                         "milvus-lite:./gallery.db")],
    data_dir: Annotated[Path, typer.Option(help="The embedded store's data folder (its gallery/ is read, never "
                                           "changed); Milvus mode keeps photo bytes in its photos/")]
    = Path("concord-data"),
    to_data_dir: Annotated[Path | None, typer.Option(help="Data folder of the Milvus-mode servers (photo bytes go "
                                                     "to its photos/; default: --data-dir)")] = None,
    index_kind: Annotated[str, typer.Option("--index", help="Milvus index of a new collection: flat, "
                                            "hnsw:M=16,ef_search=128 or ivf")] = "flat",
) -> None:
    """Move an embedded store into Milvus as it is: the same ids, vectors, models, metadata, timestamps, settings
    and photo bytes; nothing is re-encoded, and every row is read back and compared before it reports."""
    from server.store.migrate import migrate as run_migration

    try:
        report = run_migration(data_dir, gallery, to_data_dir or data_dir, index_kind)
    except (ValueError, RuntimeError, OSError) as err:
        fail(str(err))
    print(report.summary())
    if report.lost:
        raise typer.Exit(1)


@app.command()
def backfill(
    server: Annotated[str, typer.Option(envvar="CONCORD_SERVER", help=SERVER_HELP)] = DEFAULT_SERVER,
    api_key: Annotated[str | None, typer.Option(help="API key (env CONCORD_API_KEY)", envvar="CONCORD_API_KEY")]
    = None,
    share: Annotated[float, typer.Option(help="The part of the photos needing it to re-encode, those that pay most "
                                         "first (0 < share <= 1).")] = 1.0,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job with a progress bar until it "
                                       "ends (--no-wait: start it and return).")] = True,
    status: Annotated[bool, typer.Option("--status", help="Print the job's status (JSON) and return; start "
                                         "nothing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    interval: Annotated[float, typer.Option(help="Seconds between two looks at the job.")] = 1.0,
) -> None:
    """Re-encode a server's stored photos with its active cloud model, in the background on the server (searches
    go on; a restart resumes it), and follow it with a progress bar. A job already running is followed."""
    from edge.client import RETRIES, ApiError, ConcordClient

    try:
        with ConcordClient(server, api_key, retries=RETRIES) as client:
            job = client.request("GET", "/v1/backfill")
            if status:
                print(json.dumps(job, indent=2))
                return
            if job["state"] == "running":
                print(f"a backfill to {job['target_model']} is running already; following it", file=sys.stderr)
            else:
                job = client.request("POST", "/v1/backfill", json={"share": share})
            if wait:
                job = _follow(client, job, progress, interval)
    except ApiError as err:
        fail(str(err))
    _report(job, wait)


def _follow(client: ConcordClient, job: dict[str, Any], progress: bool, interval: float) -> dict[str, Any]:
    """Poll GET /v1/backfill until the job ends, showing photos handled of its total (tqdm on stderr)."""
    from tqdm import tqdm

    with tqdm(total=job.get("total"), unit="photo", desc="backfill", disable=not progress, smoothing=0.1) as bar:
        while True:
            if job.get("total") is not None and bar.total != job["total"]:
                bar.total = job["total"]
                bar.refresh()
            bar.update(job["done"] + job["failed"] + job["skipped_gone"] - bar.n)
            bar.set_postfix(done=job["done"], failed=job["failed"])
            if job["state"] != "running":
                return job
            time.sleep(max(0.05, interval))
            job = client.request("GET", "/v1/backfill")


def _report(job: dict[str, Any], waited: bool) -> None:
    """Print how the job ended (or that it started); exit 1 when it failed or stopped, 2 when photos failed."""
    if not waited:
        print(f"backfill to {job['target_model']} started: {job['message']} (follow it: concord backfill --status)")
        return
    if job["state"] in ("failed", "interrupted"):
        fail(f"the backfill {job['state']}: {job['message']}")
    print(f"backfill {job['state']}: {job['message']}")
    if job["failed"]:
        print(f"concord: failed to decode: photos {job['failed_ids']}", file=sys.stderr)
        raise typer.Exit(2)


@app.command()
def demo(
    release: Annotated[Path | None, typer.Option(help="Release folder (env CONCORD_RELEASE; default: the shipped "
                                                 "release)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="An empty folder for the demo's store, kept afterwards "
                                                  "(default: a temporary folder, removed at the end)")] = None,
    photos: Annotated[Path | None, typer.Option(help="A folder of your own photos (default: scikit-image's bundled "
                                                "photos)")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads per encoder")] = None,
) -> None:
    """Index photos, search from the edge model, upgrade the cloud model with no re-indexing, search again."""
    from server.bench.demo import main

    raise typer.Exit(main(release, data_dir, photos, threads))


@app.command("verify-release")
def verify_release(
    release: Annotated[Path | None, typer.Option(help="Release folder (env CONCORD_RELEASE; default: the shipped "
                                                 "release)")] = None,
    data: Annotated[Path | None, typer.Option(help="Caltech-101 folder (env CONCORD_DATA; default "
                                              "../shared/datasets/caltech101)")] = None,
    work: Annotated[Path, typer.Option(help="Stores and query embeddings, kept so a rerun resumes")]
    = Path("cache/verify-release"),
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("reports/release"),
    tolerance: Annotated[float, typer.Option(help="Largest |measured - manifest| Recall@1")] = 0.005,
    batch: Annotated[int, typer.Option(help="Photos per upload request")] = 32,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads (server and client)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars")] = True,
) -> None:
    """Check through a real server that the release's models reproduce the Recall@1 in their manifest."""
    from server.bench.verify_release import main

    raise typer.Exit(main(release, data, work, out, tolerance, batch, threads, progress))


@app.command()
def bench(
    part: Annotated[str, typer.Argument(help="all (search, encode, upgrade), one of them, load, or backends (the "
                                        "gallery backends side by side: embedded and Milvus); load and backends "
                                        "are not in all")] = "all",
    quick: Annotated[bool, typer.Option(help="Small sizes: proves the command in seconds (reports go to "
                                        "reports/bench/quick); the figures are not for quoting.")] = False,
    release: Annotated[Path | None, typer.Option(help="Release folder (env CONCORD_RELEASE; default: the shipped "
                                                 "one)")] = None,
    photos: Annotated[Path | None, typer.Option(help="Real photos, a folder or list file (default: "
                                                "$CONCORD_DATA/101_ObjectCategories, Caltech-101)")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Real embeddings (.npz/.npy or a folder) the synthetic "
                                                    "gallery imitates (default: reports/benchmark/embeddings/"
                                                    "cloud-v2.npz; absent: centres from a fixed seed)")] = None,
    evaluation: Annotated[Path | None, typer.Option(help="Evaluation report with the mixed-gallery curve "
                                                    "(default: reports/benchmark/caltech101.json)")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: reports/bench)")] = None,
    sizes: Annotated[str | None, typer.Option(help="Gallery sizes, comma-separated (default: 10000,100000,"
                                              "1000000; quick: 1000,3000)")] = None,
    api: Annotated[bool, typer.Option("--api/--no-api", help="Also time the HTTP API on real servers.")] = True,
    keep_work: Annotated[bool, typer.Option(help="Keep the scratch stores and server logs.")] = False,
    backends: Annotated[str | None, typer.Option(help="For 'backends': which, comma-separated, of embedded-flat, "
                                                 "embedded-hnsw, milvus-hnsw, milvus-lite-flat (default: all)")]
    = None,
) -> None:
    """Benchmark search, encoding and upgrade cost; write reports/bench (JSON, summary.md, PNG plots). `load`
    (not part of all): req/s, p50 and p99 at 1, 8 and 32 clients, all cores beside one core, and crash recovery."""
    if part == "load":
        from server.bench.load import main as load

        try:
            load(quick, release=release, out=out, keep_work=keep_work)
        except (ValueError, OSError, RuntimeError) as err:
            fail(str(err))
        return
    from server.bench.suite import main

    try:
        main(part, quick, sizes, api, keep_work, backends, release=release, photos=photos, embeddings=embeddings,
             evaluation=evaluation, out=out)
    except (ValueError, OSError, RuntimeError) as err:
        fail(str(err))


@app.command("web-bench")
def web_bench(
    release: Annotated[Path | None, typer.Option(help="Release folder (env CONCORD_RELEASE; default: the shipped "
                                                 "release)")] = None,
    photos: Annotated[Path | None, typer.Option(help="A folder of photos (default: scikit-image's bundled photos, "
                                                "several sizes, a greyscale one and a PNG)")] = None,
    rounds: Annotated[int, typer.Option(help="Timed encodes per photo, in the browser and in Python")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed encodes per photo first")] = 3,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("reports/web"),
) -> None:
    """Time the search page's in-browser encoder against onnxruntime in Python; write <out>/web_bench.json and .md."""
    from server.bench.browser import BrowserMissing
    from server.bench.web import main

    try:
        main(release, photos, rounds, warmup, out)
    except (BrowserMissing, ValueError, RuntimeError, OSError) as err:
        fail(str(err))
