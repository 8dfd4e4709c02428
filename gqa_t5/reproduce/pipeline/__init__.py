"""The scaled-down reproduction: presets (`presets`), expected stage times (`estimate`), the
cached stage store (`stages`), the training/conversion/evaluation glue (`training`, `tasks`),
decode timing (`timing`), progress lines (`progress`) and the pipeline itself, readable top to
bottom (`run`)."""
