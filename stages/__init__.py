"""Pipeline stages: thin command-line verbs that parse arguments, load params and call `lm`."""
