"""Thin entry points that Ray runs: each parses its inputs, validates them and calls ``finetune``.

Every worker module stays small; the work itself lives in the ``finetune`` library, which is
importable and testable without Ray or a GPU.
"""
