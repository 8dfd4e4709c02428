"""The paper at full scale, without a pod: its jobs as data (`jobs`), their abstract checks
(`checks`) and the dry run that prints the pod commands (`dry_run`); the simulation of its decode
timing that `scripts/simulate_paper_timing.py` prints (`timing_sim`, from `gqa_t5.perf_model`);
and every job and the timing programs compiled for TPU v4 (`compile`, `tpu_timing`)."""
