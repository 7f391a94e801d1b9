"""The dataset pipeline: read, normalise, validate, tokenise with the model's chat template, pack.

Every row is accounted for: it becomes a sample, or a located problem (``file:line: reason``)
that the recipe's bad-row policy decides on. Nothing is dropped silently.
"""
