"""Pipeline stages: thin command-line verbs that parse arguments, load params and call `lm`."""

import lm  # noqa: F401  (first: it sets how torch's OpenMP threads wait before a stage imports torch)
