"""Roofline model of the paper's decode timing (Table 1, Figure 6) for T5.1.1-Large/XXL on TPU v4.

  python scripts/simulate_paper_timing.py [--chips 8] [--model-parallel 8] [--kv-layout replicated]

See gqa_t5/perf_model.py for the model and
gqa_t5/reproduce/paper_scale/timing_sim.py for the report.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gqa_t5.reproduce.paper_scale.timing_sim import main  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  raise SystemExit(main())
