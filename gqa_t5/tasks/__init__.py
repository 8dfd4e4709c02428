"""Seqio tasks, preprocessors and metrics of the paper and of the offline demo suite.

Importing this package registers the tasks, as seqio users expect:

  import gqa_t5.tasks
  seqio.get_mixture_or_task("cnn_dailymail")

the paper's tasks always (`paper.PAPER_TASK_NAMES`, vocabulary from `$GQA_T5_VOCAB` or
T5's public one, opened only when first used), the demo tasks (`demo.DEMO_TASK_NAMES`) when
complete demo data exists at `$GQA_T5_DEMO_DATA` or ~/.cache/gqa_t5/demo_data; call
`demo.register_demo_tasks(dir)` for another directory. Registering twice is harmless.

This is the one package whose import is deliberately not cheap: it imports seqio and
TensorFlow, because registration is its purpose. The submodules `lengths` and `metrics`
need neither, but importing them through this package runs the registration too.
"""

from gqa_t5.tasks import demo as _demo
from gqa_t5.tasks import paper as _paper

_paper.register_paper_tasks()
_demo.register_demo_tasks_if_present()
