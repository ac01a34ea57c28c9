"""Benchmarks behind `capcli benchmark`: one module per benchmark over one timing harness.

- :mod:`.harness`: warm-up, synchronised timing, peak memory, OOM retry, environment facts;
- :mod:`.train`: training-step throughput (the trainer's own step);
- :mod:`.encoders`: size, FLOPs and speed of encoders side by side;
- :mod:`.decode`: captioning throughput (encoder + beam search);
- :mod:`.prepare`: ``prepare`` against bare Pillow;
- :mod:`.study`: the paper's grid (encoders x learning rates x teacher forcing), trained and scored;
- :mod:`.plot`: PNG plots of the rows.
"""

from capcli.bench.decode import bench_decode
from capcli.bench.encoders import CPU_ENCODERS, GPU_ENCODERS, ROW_KEYS, bench_encoder
from capcli.bench.harness import (
                                  PeakMemory,
                                  ProgressFn,
                                  device_name,
                                  encoder_gflops,
                                  env_info,
                                  load_average,
                                  set_threads,
                                  time_fn,
)
from capcli.bench.plot import plot_encoders
from capcli.bench.train import MODES, bench_train

__all__ = ["bench_decode", "bench_encoder", "bench_train", "plot_encoders", "time_fn", "PeakMemory", "ProgressFn",
           "device_name", "encoder_gflops", "env_info", "load_average", "set_threads", "CPU_ENCODERS",
           "GPU_ENCODERS", "ROW_KEYS", "MODES"]
