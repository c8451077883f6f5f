"""Latent reader throughput from object storage: moto's S3 server behind a proxy that adds a fixed latency
to every request, against the same store on local disk.

    python bench/reader.py                  # about 2 minutes on 2 CPU cores; no network, no GPU
    python bench/reader.py --rows 16384     # a bigger store

Store: ``--rows`` rows of SD-VAE's 256 px latent shape (4, 32, 32), float16 mean and std with both flips
(32 KiB a row, as the ImageNet store has), 1,024-row shards, written with the store's own stage functions.
S3: moto's ThreadedMotoServer on 127.0.0.1, spoken to by s3fs through a small threading HTTP proxy on
127.0.0.1 that sleeps ``--latency-ms`` (default 20) before forwarding each request and counts them.

Each measure: a fresh ``LatentDataset`` (the reader training uses) and ``global_batch(step, 256)`` for one
epoch in one process, latents/s including the noise draw; requests counted at the proxy from the reader's
construction to its last batch.
- in memory: ``in_memory=True`` (the whole store loaded first; not counted in the time);
- stream, cold: ``in_memory=False`` with an empty node-local cache: every shard is read once from the store;
- stream, warm: a second reader on the same cache (a resumed run, or another rank of the node);
- zarr per-row: ``stream=False``, the reader's previous non-memory path (zarr ``oindex`` per batch), for a few
  steps only: it is slow.

Prints a table and writes JSON (bench/results/reader.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import latents  # noqa: E402
from storage.fs import upload_dir  # noqa: E402
from storage.latent_dataset import LatentDataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reader.json"
SHAPE = (4, 32, 32)


class LatencyProxy(ThreadingHTTPServer):
    """Forwards every HTTP request to ``target`` after ``latency_s``; counts the requests by method."""

    daemon_threads = True

    def __init__(self, target: str, latency_s: float):
        self.target = target.split("://", 1)[1]
        self.latency_s = latency_s
        self.counts: dict[str, int] = {}
        self.count_lock = threading.Lock()
        self.local = threading.local()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def total(self) -> int:
        with self.count_lock:
            return sum(self.counts.values())


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's connection pool expects

    def log_message(self, *args) -> None:  # one line per request would drown the table
        pass

    def _forward(self) -> None:
        server: LatencyProxy = self.server  # type: ignore[assignment]
        with server.count_lock:
            server.counts[self.command] = server.counts.get(self.command, 0) + 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(server.latency_s)
        conn = getattr(server.local, "conn", None)
        if conn is None:
            conn = server.local.conn = http.client.HTTPConnection(server.target, timeout=120)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # a HEAD answer carries the object's length, not its own (s3fs reads sizes from it)
        self.send_header(
            "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def make_store(path: str, rows: int, shard_size: int) -> None:
    latents.write_synthetic(path, rows, SHAPE, shard_size, num_classes=1000)


def measure(url: str, proxy: LatencyProxy | None, steps: int, batch: int, reference, **reader_kwargs) -> dict:
    before = proxy.total() if proxy else 0
    t0 = time.perf_counter()
    reader = LatentDataset(url, seed=0, **reader_kwargs)
    t_open = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(steps):
        x, y = reader.global_batch(step, batch)
        if step == 0:
            x0, y0 = reference
            assert torch.equal(x, x0) and torch.equal(y, y0), "not the in-memory reader's batch"
    seconds = time.perf_counter() - t1
    requests = (proxy.total() - before) if proxy else None
    if reader.stream is not None:
        reader.stream.close()
    samples = steps * batch
    return {
        "latents_per_s": samples / seconds,
        "open_s": t_open,
        "seconds": seconds,
        "samples": samples,
        "requests": requests,
        "requests_per_1000_samples": None if requests is None else 1000 * requests / samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--zarr-steps", type=int, default=3, help="steps of the slow zarr per-row path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    os.environ.pop("AWS_PROFILE", None)
    from moto.server import ThreadedMotoServer

    tmp = tempfile.mkdtemp(prefix="bench-reader-")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    proxy = LatencyProxy(moto_url, args.latency_ms / 1000)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        local = os.path.join(tmp, "store.zarr")
        t = time.perf_counter()
        make_store(local, args.rows, args.shard_size)
        print(f"store: {args.rows} rows of {SHAPE} float16 in {time.perf_counter() - t:.1f} s", flush=True)
        os.environ["DUMO_S3_ENDPOINT_URL"] = moto_url  # upload straight to moto: the proxy is for reading
        import s3fs

        s3fs.S3FileSystem(endpoint_url=moto_url, skip_instance_cache=True).mkdir("bench")
        upload_dir(local, "s3://bench/store.zarr")
        os.environ["DUMO_S3_ENDPOINT_URL"] = proxy.url
        s3 = "s3://bench/store.zarr"
        memory = LatentDataset(local, seed=0, in_memory=True)
        steps = memory.steps_per_epoch(args.batch)
        reference = memory.global_batch(0, args.batch)
        rows = []

        def add(name: str, url: str, via_proxy: bool, n: int, **kw) -> None:
            r = measure(url, proxy if via_proxy else None, n, args.batch, reference, **kw)
            rows.append({"measure": name, **r})
            req = "" if r["requests"] is None else f", {r['requests_per_1000_samples']:.1f} requests/1000 samples"
            print(f"{name}: {r['latents_per_s']:,.0f} latents/s{req}", flush=True)

        add("in memory, local disk", local, False, steps, in_memory=True)
        local_cache, s3_cache = os.path.join(tmp, "cache-local"), os.path.join(tmp, "cache-s3")
        add("stream, local disk, cold cache", local, False, steps, in_memory=False, cache_dir=local_cache)
        add("stream, local disk, warm cache", local, False, steps, in_memory=False, cache_dir=local_cache)
        add("stream, S3 +20 ms, cold cache", s3, True, steps, in_memory=False, cache_dir=s3_cache)
        add("stream, S3 +20 ms, warm cache", s3, True, steps, in_memory=False, cache_dir=s3_cache)
        add("zarr per-row (stream=False), S3 +20 ms", s3, True, args.zarr_steps, in_memory=False, stream=False)
        add("zarr per-row (stream=False), local disk", local, False, args.zarr_steps, in_memory=False, stream=False)
    finally:
        proxy.shutdown()
        moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    by = {r["measure"]: r for r in rows}
    cold_ratio = (
        by["stream, S3 +20 ms, cold cache"]["latents_per_s"] / by["stream, local disk, cold cache"]["latents_per_s"]
    )
    warm = by["stream, S3 +20 ms, warm cache"]["latents_per_s"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    load = os.getloadavg()[0]
    print(f"\nmachine: {machine}; load average {load:.1f}; {args.rows} rows, batch {args.batch}, {steps} steps/epoch")
    print("| measure | latents/s | S3 requests / 1000 samples |")
    print("| --- | --- | --- |")
    for r in rows:
        req = "-" if r["requests"] is None else f"{r['requests_per_1000_samples']:.1f}"
        print(f"| {r['measure']} | {r['latents_per_s']:,.0f} | {req} |")
    print(f"| **S3 warm cache** (goal >= 20,000) | **{warm:,.0f}** | |")
    print(f"| **S3 cold / local disk cold** (goal >= 0.80) | **{cold_ratio:.2f}** | |")
    RESULTS.parent.mkdir(exist_ok=True)
    result = {
        "machine": machine,
        "load_average_at_end": load,
        "rows": args.rows,
        "shard_size": args.shard_size,
        "batch": args.batch,
        "latency_ms": args.latency_ms,
        "measures": rows,
        "s3_warm_latents_per_s": warm,
        "s3_cold_over_local_cold": cold_ratio,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
