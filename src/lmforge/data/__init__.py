"""Data pipeline: readers, cleaning, dedup, filters, shards."""
