"""The demonstration behind `python -m vera_ext demo`: VeRA fine-tuning of a real pretrained model, offline.

``cli`` holds the stages and the command line, ``dataset`` the labelled sentences kept in ``data/``, ``model`` the
encoder and its classification head.
"""

from .cli import main, parse_args, run

__all__ = ["main", "parse_args", "run"]
