"""Serve the web demo on 127.0.0.1: js/ as the site root and an export folder as /model/.

    python js/web/serve.py OUT_DIR [--port 8000]
    then open http://127.0.0.1:8000/web/?autorun=1

Python's own `http.server` does not know every MIME type a module page needs (`.mjs`, `.wasm`);
this one does, and it maps /model/ to the export folder so nothing is copied.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import posixpath
import threading
import urllib.parse
from pathlib import Path

JS_ROOT = Path(__file__).resolve().parent.parent  # js/


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream"}

    def __init__(self, *args, model_dir: Path, **kwargs):
        self.model_dir = model_dir
        super().__init__(*args, directory=str(JS_ROOT), **kwargs)

    def translate_path(self, path: str) -> str:
        clean = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        if clean == "/model" or clean.startswith("/model/"):
            relative = clean[len("/model"):].lstrip("/")
            target = (self.model_dir / relative).resolve()
            if target == self.model_dir or self.model_dir in target.parents:
                return str(target)
            return str(self.model_dir / "__outside__")
        return super().translate_path(path)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def start(model_dir: str | Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1 (port 0: any free one) running in a daemon thread; call .shutdown() to stop."""
    handler = functools.partial(Handler, model_dir=Path(model_dir).resolve())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="an export folder written by prefix-export")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = start(args.model_dir, args.port)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/web/?autorun=1 (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
