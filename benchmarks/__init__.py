"""Speed and memory benchmarks (print ratios, write JSON)."""
