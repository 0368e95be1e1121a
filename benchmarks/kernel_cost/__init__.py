"""Building blocks of benchmarks/kernel_report.py: the GPU's figures, occupancy, resources read from the binary,
traced traffic, the time model."""
