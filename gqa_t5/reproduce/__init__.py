"""`gqa-t5 reproduce`: the paper's Table 1 and Figures 3-6 at small scale (`pipeline/`), the
outputs and verdicts (`report/`), and the paper-scale dry run and timing model (`paper_scale/`).
`main` is the command's entry point (cli.py)."""


def main(argv=None):
  # The top-level `gqa-t5` dispatcher names this package; the command's modules load JAX, so
  # they are imported when the command runs, not when `gqa-t5 --help` lists the commands.
  from gqa_t5.reproduce import cli  # pylint: disable=g-import-not-at-top
  return cli.main(argv)
