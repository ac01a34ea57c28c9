"""Data: sources -> HDF5 dataset dir (prepare), vocabulary, dataset + collate, images, synthetic scenes."""
