"""Encoder (timm), soft attention, LSTM decoder and the captioner that joins them."""
