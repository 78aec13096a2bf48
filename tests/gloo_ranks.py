"""Two gloo ranks on the CPU for the distributed tests.

A test writes a worker script and runs it with :func:`run_worker` (a subprocess: a crash in
torch.distributed cannot take pytest down). The script defines ``rank_main(rank, world, *args,
results)``, calls :func:`join` first in it, puts its outcome on ``results``, and calls
:func:`spawn_two` under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def join(rank: int, world: int, port: int) -> None:
    """Join the gloo group on 127.0.0.1:port, one torch thread per rank (two ranks share the
    machine's cores)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn_two(rank_main, *args) -> list:
    """rank_main(rank, 2, port, *args, results) in two spawned processes; the two values they
    put on ``results``, sorted (by rank when they are (rank, ...) tuples)."""
    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(2, port, *args, results), nprocs=2)
    return sorted(results.get() for _ in range(2))


def run_worker(folder: Path, source: str, *argv: str, timeout: float) -> subprocess.CompletedProcess:
    """Write ``source`` to folder/worker.py and run it (this folder importable), capturing its
    output."""
    script = folder / "worker.py"
    script.write_text(source)
    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=folder,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})
