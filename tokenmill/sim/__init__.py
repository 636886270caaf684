"""Scheduling simulator: the real scheduler on a virtual clock with a step-time cost model."""
