"""The paper at full scale, without a pod: its jobs as data (`jobs`), their abstract checks
(`checks`) and the dry run that prints the pod commands (`dry_run`); the roofline model of its
decode timing (`roofline`) and the simulation `scripts/simulate_paper_timing.py` prints
(`timing_sim`)."""
