"""Checkpoint formats: T5X legacy (msgpack + tensorstore), Orbax, Hugging Face, Mesh TensorFlow.

Every reader returns the T5X T5.1.1 parameter tree as numpy arrays (see `tree.py`). Nothing is
imported eagerly: import the module of the format you need, or `gqa_t5.checkpoints.detect`
for `load_params` / `open_checkpoint`.
"""
