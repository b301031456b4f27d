"""lmforge: the whole life of a language model in one readable toolkit."""
__version__ = "0.1.0"
