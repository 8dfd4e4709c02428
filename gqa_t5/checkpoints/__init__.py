"""Checkpoint formats: T5X legacy (msgpack + tensorstore), Orbax, Hugging Face, Mesh TensorFlow.

Every reader returns a `source.CheckpointSource`: the T5X T5.1.1 parameter names (see `tree.py`)
as lazily read tensors; `detect.load_params` reads them into numpy arrays. Nothing is imported
eagerly: import the module of the format you need, or `gqa_t5.checkpoints.detect` for
`load_params` / `open_checkpoint`.
"""
