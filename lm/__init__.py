"""A reproducible study of language models, from a bigram table to a GPT: the library behind the DVC stages."""

from lm import threads

threads.configure()  # before anything loads torch: libgomp reads how to wait once (lm/threads.py)
