"""tools/bench_egrsd.py measures right: what runs in a process of its own counts that process's memory."""
import multiprocessing
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench_egrsd  # noqa: E402


def test_a_part_in_a_spawned_process_counts_its_own_peak_memory_not_its_parents():
    held = torch.ones(3 * 2**29, dtype=torch.uint8)  # 1.5 GiB held here, every page touched
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak = pool.apply(bench_egrsd.peak_rss_bytes)
    assert bench_egrsd.rss_bytes() > held.numel() > peak, "the child's peak: its imports, not the parent's 1.5 GiB"
