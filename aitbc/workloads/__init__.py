"""Workloads: what the coordinator and the miner both need to know of a job."""
