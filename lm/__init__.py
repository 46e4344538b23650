"""A reproducible study of language models, from a bigram table to a GPT: the library behind the DVC stages."""
