"""Backend benchmark (eager vs onnxruntime vs ...): the same code as ``engine bench backends``.

python benchmarks/bench_backends.py --backend eager --backend onnxruntime --preset tiny --threads 2
# -> benchmarks/results/backends_cpu.json and backends_cpu.png (on a GPU: --device cuda -> backends_cuda.*)
"""

from __future__ import annotations

import sys

from streaming.cli.bench import bench

if __name__ == "__main__":
    bench.main(args=["backends", *sys.argv[1:]], prog_name="bench_backends.py")
