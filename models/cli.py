"""The `concord` command: a thin dispatcher that imports only the part that owns the subcommand.

Each part (`training`, `edge`, `server`) has a `cli` module with a Typer `app`; heavy imports (torch,
onnxruntime, FAISS) happen inside its commands, so `concord serve` never loads torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("training.cli", "Cache frozen trunk features of the benchmark photos (speeds up training)."),
    "train": ("training.cli", "Train one model from an experiment config."),
    "evaluate": ("training.cli", "Evaluate trained models: compatibility matrix, ECC, NFR, mixed gallery."),
    "evaluate-release": ("training.cli", "Measure a release's ONNX files on the open-world photos (its Caltech "
                                         "figures are in its manifest)."),
    "benchmark": ("training.cli", "Run the whole benchmark: train every model, then evaluate (resumable)."),
    "fingerprint": ("training.cli", "Fit the space's photo fingerprint (used for near-duplicate search)."),
    "restore": ("training.cli", "Continue the chain from a release: its models' heads into their checkpoints."),
    "backfill": ("server.cli", "Re-encode stored photos with the active cloud model on the server, in the "
                               "background (resumable), with a progress bar."),
    "export": ("training.cli", "Export checkpoints to a release folder of ONNX files with a manifest."),
    "quantize": ("edge.cli", "Quantise an edge model to int8 (static QDQ, calibrated on real photos)."),
    "halve": ("edge.cli", "Store a model's weights as fp16 (computed in fp32): half the file, checked on photos."),
    "ship": ("edge.cli", "Write the slim release that ships: cloud server files, edge int8 device files."),
    "encode": ("edge.cli", "Encode photos on this device and print or save their embeddings."),
    "query": ("edge.cli", "Encode a photo on this device and search a Concord server with its embedding."),
    "device-bench": ("edge.cli", "Time batch-1 encoding of edge (fp32, int8) against the cloud encoder."),
    "serve": ("server.cli", "Start the photo search server with a release and a gallery store."),
    "migrate": ("server.cli", "Move an embedded gallery store into Milvus as it is (no re-encoding), verified."),
    "index": ("edge.cli", "Send a folder of photos to a server in batches, resumable."),
    "demo": ("server.cli", "Index bundled photos, search from the edge, upgrade without re-indexing."),
    "bench": ("server.cli", "Benchmark search, encoding and upgrade cost; write reports/bench."),
    "verify-release": ("server.cli", "Check through a real server that the release reproduces its manifest's figures."),
    "web-bench": ("server.cli", "Time the search page's in-browser encoder against onnxruntime in Python."),
    "neardup": ("edge.cli", "Near-duplicate search: edge queries must find the original in the cloud gallery."),
}

DEFAULT_SERVER = "http://127.0.0.1:8000"
"""The server every client command (`query`, `index`) talks to unless given `--server` or CONCORD_SERVER: the
address `concord serve` listens on by default (a test holds the two together)."""
SERVER_HELP = f"Server URL (env CONCORD_SERVER; default {DEFAULT_SERVER})."


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `concord: message` on stderr and exit with `code` (SystemExit: Typer passes it through)."""
    print(f"concord: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Run `concord SUBCOMMAND ...`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print("usage: concord COMMAND [OPTIONS]\n\nCommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name.ljust(width)}  {text}")
        print("\nRun `concord COMMAND --help` for the options of one command.")
        return
    if args[0] not in COMMANDS:
        sys.exit(f"concord: unknown command {args[0]!r}; run `concord --help` for the list")
    module = importlib.import_module(COMMANDS[args[0]][0])
    module.app(args=args, prog_name="concord")
