"""vlmtune: fine-tune vision-language models on your own image+text data."""

__version__ = "0.1.0"
