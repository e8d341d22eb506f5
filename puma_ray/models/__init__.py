"""Models: pure torch and HF, no training loop, no files of ours.

    identity.py     which model: name, family, width, weight fingerprint
    backbone.py     a frozen causal LM + tokenizer loaded with from_pretrained; its fingerprint
    tiny.py         tiny random models of five families (tests, demos), and the per-family configs foundations use
    prompted_lm.py  a template holding a user's soft prompt, read out at the label tokens (Eq. 1's M(T(p_u, i)))
    heads.py        the task heads over the label logits, and the task losses
    adapter.py      the migration function Phi (Eq. 2): the paper's MLP adapter and the linear baseline
"""
