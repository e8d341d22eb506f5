"""Artifacts: what runs write and read back, every byte of it untrusted on the way in.

    formats.py     every file name and format id, and the one format check
    store.py       the personalization store: prompt shards + head + manifest (written last), bound to its model
    adapter_io.py  the adapter artifact: config (written last) + adapter and head weights; symmetric save/load
    verify.py      a store re-read in full against its manifest and its sources
    serving.py     a store's prompts exported as plain tensors for an inference server
"""
