"""capcli: CNN + attention-LSTM image captioning, from data preparation to benchmarks."""

__version__ = "0.1.0"
