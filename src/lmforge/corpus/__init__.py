"""Reading corpora: the `Document` unit, file/JSONL/Parquet readers and the embedded stdlib corpus.

It sits below every stage, so `data clean` and `tokenizer train` read inputs the same way
without one stage importing the other.
"""
