"""Benchmarks (programs, not tests): python -m edge_vlm_ros.bench.run --mode quick --out results/quick"""
