"""Benchmarks behind `capcli benchmark`: one module per benchmark over one timing harness.

- :mod:`.harness`: warm-up, synchronised timing, peak memory, OOM retry, environment facts;
- :mod:`.train`: training-step throughput (the trainer's own step);
- :mod:`.encoders`: size, FLOPs and speed of encoders side by side;
- :mod:`.decode`: captioning throughput (encoder + beam search);
- :mod:`.prepare`: ``prepare`` against bare Pillow;
- :mod:`.study`: the paper's grid (encoders x learning rates x teacher forcing), trained and scored;
- :mod:`.plot`: PNG plots of the rows.
"""
