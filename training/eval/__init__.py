"""DreamBench evaluation: protocol, generation, metrics and reports."""
