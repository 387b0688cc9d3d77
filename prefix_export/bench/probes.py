"""What bench measures the machine and the graphs with: bandwidth, memory, bytes a decode step must read.

The floor of a decode step is (weights read per step + the KV cache) / memory read bandwidth: no
version can be faster than reading each once. `measure_bandwidth` gives the CPU's ceiling,
`measure_gpu_bandwidth` the GPU's; `PeakMemory` samples RSS while a backend is created and run.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_bandwidth(size_mb: int = 1024, passes: int = 5, threads: int | None = None) -> dict:
    """Memory read bandwidth: the best of `passes` reads of a buffer far larger than the caches.

    Method: a float32 buffer of `size_mb` (pages touched first), split in one contiguous slice per
    core; each pass, one thread per slice computes `np.dot(s, s)` (BLAS, vectorised, reads each
    element once; numpy releases the GIL), and the pass's bandwidth is buffer bytes / wall time. A
    single whole-buffer `np.dot` (which BLAS may thread itself) is tried too; the best pass is quoted.
    """
    threads = threads or os.cpu_count() or 1
    buffer = np.ones(size_mb * 1024**2 // 4, dtype=np.float32)
    slices = np.array_split(buffer, threads)
    results = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            start = time.perf_counter()
            list(pool.map(lambda s: float(np.dot(s, s)), slices))
            results.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    for _ in range(max(1, passes // 2)):
        start = time.perf_counter()
        float(np.dot(buffer, buffer))
        results.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    del buffer, slices
    return {"gb_per_s": round(max(results), 2), "passes_gb_per_s": [round(r, 2) for r in results],
            "buffer_mb": size_mb, "threads": threads,
            "method": "best pass of np.dot(s, s) over a float32 buffer, one slice per core in threads "
                      "(and one whole-buffer np.dot); bytes read / wall time"}


def measure_gpu_bandwidth(size_mb: int = 1024, passes: int = 10) -> dict | None:
    """The GPU's memory bandwidth through PyTorch, or None without a CUDA device.

    Method: device-to-device copies of a `size_mb` float32 buffer, timed with CUDA events after a
    warm-up; bytes read + bytes written per copy / time, the best pass quoted. A decode step mostly
    reads, so this is the ceiling its floor is computed with (the same way as on the CPU).
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    source = torch.rand(size_mb * 1024**2 // 4, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    results = []
    for _ in range(passes):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        results.append(2 * source.nbytes / (start.elapsed_time(end) * 1e-3) / 1e9)
    name = torch.cuda.get_device_name(0)
    del source, target
    torch.cuda.empty_cache()
    return {"gb_per_s": round(max(results), 1), "passes_gb_per_s": [round(r, 1) for r in results],
            "buffer_mb": size_mb, "device": name,
            "method": "best of device-to-device copies (torch, CUDA events); bytes read + written / time"}


def weights_read_per_token(graph: Path) -> int:
    """Bytes of initializers a decode step reads: all but those only gathered (embedding rows) and
    the folded prefix (counted with the KV cache)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if init.name.startswith("prefix_") or consumers.get(init.name, {"Gather"}) <= {"Gather"}:
            continue
        nbytes = len(init.raw_data) if init.HasField("raw_data") else 0
        if not nbytes:
            for entry in init.external_data:
                if entry.key == "length":
                    nbytes = int(entry.value)
            if not nbytes:
                nbytes = init.ByteSize()
        total += nbytes
    return total


def kv_bytes(spec, batch: int, positions: int, itemsize: int = 4) -> int:
    """The whole KV cache, (L, 2, B, H_kv, positions, D), read once per decode step."""
    return 2 * spec.num_layers * batch * spec.num_kv_heads * positions * spec.head_dim * itemsize


class PeakMemory:
    """Samples this process's RSS every few ms while active; `peak_mb` is the highest seen."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        return self.process.memory_info().rss / 1024**2

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
