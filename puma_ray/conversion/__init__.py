"""Batch conversion: a fitted adapter applied to every user of the source store(s) → a complete target store.

    plan.py   ConvertConfig and ConversionPlan (the units, what the output is a conversion of)
    run.py    plan_conversion + convert: checks, units (locally or on a Runner such as the Ray actor pool), finalize
    units.py  one unit's work and the output's progress state; the manifest only when every user is accounted for
"""
