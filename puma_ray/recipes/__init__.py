"""Recipes: what a job runs, as fixed stages over the layers below. `jobs/<name>.py` = arguments → `JOBS[name]`
→ recipe → print.

    jobs.py           the JOBS table: each job's script, config class and default config file
    runs.py           what every job does the same way: config + overrides, run folders, JSON, threads, exit
    engine.py         where heavy stages run: local runners or the Ray layer's
    train_prompts.py  a store trained on one model (Eq. 1): a source system, or full retraining
    foundation.py     foundation:<family> models: pretrained once per dataset (training/pretrain.py), cached
    migration/        a migration's stages, defined once (stages.py), run in process or on Ray (executors)
    sweep.py          the sweep's trials and report
    sweep_on_tune.py  the sweep's trials as Ray Tune trials
    benchmark.py      the paper's tables and figures from one config
"""
