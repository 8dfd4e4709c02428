"""Where the test data shipped with the repository lives."""

import os

# A tiny T5.1.1 checkpoint written by t5x itself (see its FIXTURE.md), copied from the project's
# shared/fixtures so a fresh clone runs every test with no file from outside the repository.
T5X_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "t5x_tiny")
