"""Benchmarks run with fixed threads; see benchmarks/run.py."""

import os

import torch

torch.set_num_threads(int(os.environ.get("MEDMTL_BENCH_THREADS", "2")))
