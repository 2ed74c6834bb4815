"""Model loading and saving (kat.models.hf), tokenizers (kat.models.tokenizer), MTP heads, upscaling."""
from kat.models.hf import load, load_tokenizer, save

__all__ = ["load", "load_tokenizer", "save"]
