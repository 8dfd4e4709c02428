"""A run's outputs: results.json gathered from the stages (`results`), the verdicts on the
paper's claims (`claims`), table1.md and REPORT.md (`markdown`), Figures 3-6 (`figures`), and
the paper's own numbers they are printed beside (`paper`). Everything but `results.collect`
reads only the results dict, so `--redraw` rebuilds the outputs from a results.json alone."""
