"""The DRAM-budget swapping runtime (issue 4). So far: honest I/O measurement helpers."""
