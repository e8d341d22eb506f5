"""Training: one epoch loop for every fit, and what fits share.

    records.py   records as arrays (RecordSet) and one batch through the prompted LM
    cost.py      wall time, LLM record passes and FLOPs of a stage
    evaluate.py  predictions and metrics over all of a record set
    loop.py      THE epoch loop (history, early stopping, schedule, cost counters, resume) every fit below runs
    prompts.py   Eq. 1: every user's prompt on one frozen model
    fit.py       Eq. 2: a mapping (adapter, linear, fixed prompts) through the frozen target; the Ray workers
                 run the same loop, batches and parameter groups
    pretrain.py  a foundation model pretrained in the "1+N" shape (all weights, throwaway user vectors)
    reference.py the LLM-free reference predictors (global mean, per-user mean, user + item bias)
    memory.py    freed heap memory handed back to the OS between batches
"""
