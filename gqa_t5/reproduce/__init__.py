"""`gqa-t5 reproduce`: the paper's Table 1 and Figures 3-6 at mini scale, and its paper-scale
configurations and timing model. Nothing is imported here until `main` runs."""


def main(argv=None):
  from gqa_t5.reproduce.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  return cli_main(argv)
