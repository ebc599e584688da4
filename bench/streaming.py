"""Streaming featurization at scale: n synthetic examples (1,000,000 by default) of an MLP
784-128-64-10 read through a StreamingDataset, per-example loss gradients projected to
d = 512 and written to a memory-mapped FeatureStore; resident memory measured, and the run
killed (SIGKILL) part way and resumed.

* The data: a map-style Dataset that makes example i from a generator seeded by i (x ~ N(0, 1)
  of 784 dims, a label in 0..9), so nothing is ever held whole.
* Run 1 (a subprocess) is killed once ``--kill-after`` chunks are recorded; run 2 (another
  subprocess) resumes. Each reports its peak resident memory (``ru_maxrss``, and the peak of
  the anonymous part, ``RssAnon``, sampled every 0.1 s: the mapped store's file pages are
  not anonymous) next to the estimate that ``build_gradient_store`` checks before starting.
* Then: the store is complete, ``FeatureStore.verify()`` passes, run 1's chunk records were
  not rewritten by run 2 (only the missing chunks were computed), and rows from chunks of
  both runs equal gradients recomputed here from collated tensors (no streaming).

    python bench/streaming.py                       # n = 1,000,000, d = 512
    python bench/streaming.py --n 20000 --threads 2 # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common import add_machine_flags, setup_machine
from tdatune.data.base import ArrayDataset
from tdatune.data.streaming import stream_dataset
from tdatune.features.budget import estimate_gradients, format_bytes
from tdatune.features.factored import KroneckerProjector, make_projector
from tdatune.features.gradients import per_example_grads
from tdatune.features.projection import Projector
from tdatune.features.store import FeatureStore, build_gradient_store
from tdatune.models.small import MLP
from tdatune.models.task import make_task
from tdatune.models.training import init_model


class Synthetic(Dataset):
    """Example i: x ~ N(0, I_784) and a label in 0..9 from a generator seeded by (seed, i)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_000_007 + int(i))
        return torch.randn(784, generator=gen), torch.randint(0, 10, (), generator=gen)


def make_problem(args: argparse.Namespace, device: torch.device):
    """The task, model, parameters and streamed data (the projector is made separately)."""
    task = make_task(partial(MLP, 784, (128, 64), 10), "cross_entropy", "margin",
                     name="synthetic-mlp")
    model = init_model(task, 0, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return task, model, params, stream_dataset(Synthetic(args.n))


def projector_for(args: argparse.Namespace, model: torch.nn.Module, params: dict,
                  device: torch.device) -> Projector | KroneckerProjector:
    """The projection to ``--proj-dim`` of kind ``--proj-kind`` (gaussian, rademacher: of the
    flat gradient; kronecker: per layer, from the hooks' factors)."""
    return make_projector(args.proj_kind, model, params, args.proj_dim, seed=0, device=device)


def conditions() -> str:
    """Machine and load next to the numbers."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {model}, "
            f"{os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads; python {platform.python_version()}; load average {load}")


class AnonPeak:
    """Peak of this process's anonymous resident memory (RssAnon), sampled in a thread."""

    def __init__(self, every: float = 0.1) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        """Current RssAnon in bytes (0 where /proc is not there)."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(every)

    def stop(self) -> int:
        """Stop sampling; the peak seen."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
        return self.peak


def child(args: argparse.Namespace) -> None:
    """One featurization run (resumes whatever the store holds); prints a RESULT line."""
    device = setup_machine(args)
    sampler = AnonPeak()
    task, model, params, data = make_problem(args, device)
    base_anon = AnonPeak.now()
    projector = projector_for(args, model, params, device)
    estimate = estimate_gradients(params, args.n, projector=projector,
                                  chunk_size=args.grad_chunk, store_chunk_rows=args.chunk_rows)
    records = Path(args.dir) / "chunks"
    before = len(list(records.glob("c*.json"))) if records.is_dir() else 0
    print(f"[child {os.getpid()}] {before} chunks already recorded; estimate "
          f"{estimate.describe()}", flush=True)
    start = time.perf_counter()
    data.fingerprint()  # the one pass over the data (kept: the store reuses it)
    fingerprint_s = time.perf_counter() - start
    start = time.perf_counter()
    store = build_gradient_store(args.dir, task, model, params, data, projector=projector,
                                 chunk_rows=args.chunk_rows, grad_chunk_size=args.grad_chunk)
    build_s = time.perf_counter() - start
    computed = store.num_chunks - before
    examples = args.n - min(args.n, before * args.chunk_rows)  # chunks are written in order
    result = {
        "chunks_before": before, "chunks_computed": computed, "examples": examples,
        "fingerprint_s": fingerprint_s, "build_s": build_s,
        "rate": examples / build_s if build_s > 0 else float("nan"),
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "anon_peak": sampler.stop(), "anon_base": base_anon,
        "estimate": estimate.memory_bytes, "disk": estimate.disk_bytes,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args: argparse.Namespace, kill_after: int | None) -> tuple[dict | None, float]:
    """Run a child featurization; SIGKILL it once ``kill_after`` chunks are recorded."""
    cmd = [sys.executable, __file__, "--child", "--n", str(args.n), "--proj-dim",
           str(args.proj_dim), "--proj-kind", args.proj_kind, "--chunk-rows",
           str(args.chunk_rows), "--grad-chunk", str(args.grad_chunk), "--dir", str(args.dir),
           "--device", args.device]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent)
    records = Path(args.dir) / "chunks"
    if kill_after is not None:
        while proc.poll() is None:
            done = len(list(records.glob("c*.json"))) if records.is_dir() else 0
            if done >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    result = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print("   " + line)
    if kill_after is None and proc.returncode != 0:
        raise SystemExit(f"the resumed run failed with exit status {proc.returncode}")
    return result, wall


def spot_check(args: argparse.Namespace, store: FeatureStore, chunks: list[int]) -> float:
    """Largest relative difference between stored rows of ``chunks`` and gradients recomputed
    from collated tensors (no streaming, other batch sizes)."""
    device = setup_machine(args)
    task, model, params, _ = make_problem(args, device)
    projector = projector_for(args, model, params, device)
    source = Synthetic(args.n)
    worst = 0.0
    for chunk in chunks:
        a, b = store.chunk_bounds(chunk)
        rows = sorted({a, (a + b) // 2, b - 1})
        items = [source[i] for i in rows]
        data = ArrayDataset(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
        expected = per_example_grads(task, model, params, data, projector=projector).numpy()
        got = store[rows]
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    return worst


def main() -> None:
    """Parse flags; run the killed and the resumed featurization; verify; report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of examples")
    parser.add_argument("--proj-dim", type=int, default=512, help="projection dimension d")
    parser.add_argument("--proj-kind", default="gaussian",
                        help="gaussian, rademacher or kronecker (per layer)")
    parser.add_argument("--chunk-rows", type=int, default=1024, help="store rows per chunk")
    parser.add_argument("--grad-chunk", type=int, default=256,
                        help="examples differentiated (and collated) at a time")
    parser.add_argument("--kill-after", type=int, default=None,
                        help="chunks recorded before the first run is killed (default 1/3)")
    parser.add_argument("--dir", default=None, help="store directory (default: under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the store directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_machine_flags(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    created = args.dir is None or not Path(args.dir).exists()
    args.dir = Path(args.dir or tempfile.mkdtemp(prefix="tdatune-stream-", dir="/tmp"))
    if (args.dir / "manifest.json").exists():
        raise SystemExit(f"{args.dir} already holds a store; give an empty or new --dir")
    setup_machine(args)
    num_chunks = -(-args.n // args.chunk_rows)
    kill_after = args.kill_after or max(1, num_chunks // 3)
    print(f"conditions: {conditions()}")
    print(f"n {args.n:,}, MLP 784-128-64-10, d {args.proj_dim} ({args.proj_kind}), "
          f"{num_chunks} store chunks of {args.chunk_rows} rows, gradient chunk "
          f"{args.grad_chunk}, store {args.dir}")
    try:
        print(f"run 1: killed (SIGKILL) after {kill_after} chunks are recorded")
        _, wall1 = run_child(args, kill_after)
        records = Path(args.dir) / "chunks"
        first = {p.name: p.stat().st_mtime_ns for p in records.glob("c*.json")}
        print(f"   killed after {wall1:.1f} s with {len(first)} of {num_chunks} chunks recorded")
        print("run 2: resumes")
        result, wall2 = run_child(args, None)
        assert result is not None
        store = FeatureStore(args.dir)
        kept = all((records / name).stat().st_mtime_ns == t for name, t in first.items())
        start = time.perf_counter()
        store.verify()
        verify_s = time.perf_counter() - start
        done = sorted(int(name[1:7]) for name in first)
        resumed = sorted(set(range(num_chunks)) - set(done))
        check = spot_check(args, store, sorted({0, *done[-1:], *resumed[:1], num_chunks - 1}))
        gib = 2**30
        print(f"   {result['chunks_computed']} chunks computed "
              f"({result['examples']:,} examples) in {result['build_s']:.1f} s: "
              f"{result['rate']:.0f} examples/s; fingerprint pass {result['fingerprint_s']:.1f} s"
              f" ({args.n / max(result['fingerprint_s'], 1e-9):,.0f} examples/s); "
              f"wall {wall2:.1f} s")
        print(f"   peak resident: ru_maxrss {result['maxrss'] / gib:.2f} GiB, anonymous "
              f"{result['anon_peak'] / gib:.2f} GiB (before featurization "
              f"{result['anon_base'] / gib:.2f} GiB; increase "
              f"{format_bytes(result['anon_peak'] - result['anon_base'])} against the "
              f"estimate {format_bytes(result['estimate'])}); store on disk "
              f"{format_bytes(result['disk'])}")
        print(f"result: complete {store.complete}, verify passed ({verify_s:.1f} s), run 1's "
              f"{len(first)} chunk records untouched by run 2: {kept}, only the missing "
              f"{num_chunks - len(first)} chunks computed: "
              f"{result['chunks_computed'] == num_chunks - len(first)}, rows against collated "
              f"recomputation: max relative difference {check:.1e}")
        print(f"conditions after: {conditions()}")
        if not (store.complete and kept and check < 1e-4
                and result["chunks_computed"] == num_chunks - len(first)):
            raise SystemExit("FAILED: the resumed store is not what it should be")
    finally:
        if created and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
        else:
            print(f"kept {args.dir}")


if __name__ == "__main__":
    main()
