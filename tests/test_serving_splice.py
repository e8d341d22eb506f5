"""The serving export with the template spliced in reproduces the package's own prediction from the exported pieces
alone: plain transformers (`AutoModelForCausalLM.from_pretrained(folder)`, `inputs_embeds`) + the reader
(artifacts/serving_reader.py: no model code) + the exported head in plain torch, within 1e-5, for several users and
items, on three tiny families (Gemma's scaled embedding, a CTR template with a history, item-first wording) and
every readout kind (MLP, affine, verbalizer)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from puma_ray.artifacts.serving import export_for_serving
from puma_ray.artifacts.serving_reader import ServingPrompts, SplicedSystem
from puma_ray.artifacts.store import write_store
from puma_ray.config import TemplateConfig, to_dict
from puma_ray.errors import StoreError
from puma_ray.models.backbone import embedding_rms, load_backbone
from puma_ray.models.heads import RatingHead, VerbalizerHead, clamp_predictions, head_config, make_head, task_loss
from puma_ray.models.prompted_lm import PromptedLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITEMS = {"i1": "Toy Story (1995) Animation Children's Comedy", "i2": "Heat", "i3": "Drama Romance Thriller " * 6}
USERS = [f"u{i}" for i in range(5)]
CASES = {  # family, task, wording, head
    "gemma3-rating-mlp": ("gemma3", "rating", "paper", "mlp"),
    "llama-ctr-affine-item-first": ("llama", "ctr", "item_first", "affine"),
    "qwen2-rating-verbalizer-item-first": ("qwen2", "rating", "item_first", "verbalizer"),
}


def _head(task: str, kind: str):
    torch.manual_seed(3)
    if kind == "verbalizer":
        head = VerbalizerHead(task)
        with torch.no_grad():  # a verbalizer trained further: its scale and bias travel too
            head.scale.fill_(1.3)
            head.bias.fill_(-0.2)
        return head
    head = RatingHead() if task == "rating" else make_head(task)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return head


def _store(tmp_path, family, task, wording, kind):
    backbone = load_backbone(f"tiny:{family}")
    template = TemplateConfig.for_task(task, wording)
    rng = np.random.default_rng(0)
    l, d = 3, backbone.hidden_size
    prompts = rng.normal(0, embedding_rms(backbone.model), (len(USERS), l, d)).astype(np.float32)
    head = _head(task, kind)
    write_store(str(tmp_path / "store"), backbone.identity, np.array(USERS), prompts, head.state_dict(),
                head_config(task, head), template=to_dict(template), task=task,
                lineage={"kind": "trained", "trainer": "tests"})
    return backbone, template, head, dict(zip(USERS, prompts))


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_pieces_reproduce_the_package_prediction(case, tmp_path, tiny_model):
    family, task, wording, kind = CASES[case]
    backbone, template, head, prompts = _store(tmp_path, family, task, wording, kind)
    export = export_for_serving(str(tmp_path / "store"), str(tmp_path / "serve"), splice=True)
    assert export["splice"]["format"] == "puma_ray.serving-splice/1"

    # the package's own prediction: PromptedLM (prefix cache on, as evaluation runs) + head + clamp
    plm = PromptedLM(backbone, template, 3, ITEMS)
    pairs = [(u, i) for u in USERS[:4] for i in ITEMS]
    histories = [["i2", "i3"] if task == "ctr" else None for _ in pairs]
    batch = plm.encode([i for _, i in pairs], histories if task == "ctr" else None)
    with torch.no_grad():
        logits = plm.label_logits(torch.from_numpy(np.stack([prompts[u] for u, _ in pairs])), batch)
        _, pred = task_loss(task, head, logits, torch.zeros(len(pairs)))
    ours = clamp_predictions(task, pred.numpy())

    # from the exported pieces alone: plain transformers + the reader
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tiny_model(family)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    served = SplicedSystem(str(tmp_path / "serve"), embed=model.get_input_embeddings())
    theirs = []
    for (user, item), history in zip(pairs, histories):
        item_ids = served.item_ids(tok, item, ITEMS[item])
        assert item_ids == plm.item_fill(item)  # the documented rule is the one the model was trained with
        history_ids = served.history_ids(tok, [ITEMS[h] for h in history]) if history else None
        seq = served.assemble(user, item_ids, history_ids)
        start = served.user_offset(len(item_ids), len(history_ids or []))
        assert torch.equal(seq[start:start + 3], torch.from_numpy(prompts[user]))
        with torch.no_grad():
            out = model(inputs_embeds=seq.unsqueeze(0)).logits[0, served.splice["readout"]["position"]]
        theirs.append(float(served.predict(out[served.label_token_ids])))
    diff = np.abs(np.array(theirs) - ours).max()
    print(f"{case}: {len(pairs)} predictions, max |difference| {diff:.2e}")  # the figure the docs quote (-s)
    assert diff < 1e-5, diff
    assert np.ptp(ours) > 1e-4  # the users and items really differ: the comparison is not of constants

    # the label rows: a server that gives the last hidden state gets the same label logits from readout.safetensors
    from safetensors.torch import load_file
    rows = load_file(str(tmp_path / "serve" / "readout.safetensors"))
    seq = served.assemble(USERS[0], served.item_ids(tok, "i1", ITEMS["i1"]),
                          served.history_ids(tok, [ITEMS["i2"], ITEMS["i3"]]) if task == "ctr" else None)
    with torch.no_grad():
        run = model(inputs_embeds=seq.unsqueeze(0), output_hidden_states=True)
    from_hidden = run.hidden_states[-1][0, -1] @ rows["label_weight"].T
    torch.testing.assert_close(from_hidden, run.logits[0, -1, served.label_token_ids], atol=1e-5, rtol=0)


def test_rows_only_exports_stay_readable_and_a_spliced_one_is_owned(tmp_path):
    backbone, *_ = _store(tmp_path, "llama", "rating", "paper", "mlp")
    plain = export_for_serving(str(tmp_path / "store"), str(tmp_path / "rows"))  # jobs/convert.py --export
    assert "splice" not in plain and len(ServingPrompts(str(tmp_path / "rows")).users) == len(USERS)
    with pytest.raises(StoreError, match="per-user rows only"):
        SplicedSystem(str(tmp_path / "rows"))
    # a rerun over a spliced export replaces it (its splice files are ours); a foreign file is still refused
    export_for_serving(str(tmp_path / "store"), str(tmp_path / "rows"), splice=True)
    export_for_serving(str(tmp_path / "store"), str(tmp_path / "rows"), splice=True, dtype="bfloat16")
    assert SplicedSystem(str(tmp_path / "rows")).fixed[0].dtype == torch.bfloat16
    (tmp_path / "rows" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt"):
        export_for_serving(str(tmp_path / "store"), str(tmp_path / "rows"), splice=True)


def test_tampered_splice_is_refused(tmp_path):
    _store(tmp_path, "llama", "rating", "paper", "mlp")
    serve = tmp_path / "serve"
    export_for_serving(str(tmp_path / "store"), str(serve), splice=True)
    splice = json.loads((serve / "splice.json").read_text())
    splice["pieces_file"] = "../store/head.safetensors"
    (serve / "splice.json").write_text(json.dumps(splice))
    with pytest.raises(StoreError, match="is not a plain file name"):
        SplicedSystem(str(serve))
    splice["pieces_file"] = "template_pieces.safetensors"
    splice["pieces"][0]["ids"] = splice["pieces"][0]["ids"][:-1]  # a piece that no longer matches its tensor
    (serve / "splice.json").write_text(json.dumps(splice))
    with pytest.raises(StoreError, match="piece 0"):
        SplicedSystem(str(serve))


def test_export_job_refuses_a_model_of_other_weights(tmp_path, load_job, capsys):
    _store(tmp_path, "llama", "rating", "paper", "mlp")
    rc = load_job("export_system").main(["--store", str(tmp_path / "store"), "--to", str(tmp_path / "serve"),
                                         "--format", "serving", "--model", "tiny:qwen2"])
    assert rc == 2 and not (tmp_path / "serve").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_a_trained_verbalizer_keeps_its_scale_in_the_open_head():
    """head.json of a verbalizer whose scale/bias were trained (a migration's target head) names them; the plain
    one has no weights; both read back as they were."""
    from puma_ray.importing.readout import head_from_open, head_to_open
    for head in (_head("rating", "verbalizer"), VerbalizerHead("rating")):
        tensors, spec = head_to_open(head.state_dict(), head_config("rating", head))
        assert bool(tensors) == (head.scale.item() != 1.0)
        state, _ = head_from_open(spec, tensors, "rating", 5, "head.json")
        assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())


def test_every_report_carries_its_format(tmp_path):
    """report.json (and benchmark.json) of each job: "format" puma_ray.report/<job>/1, first."""
    from puma_ray.artifacts.formats import REPORT_FORMATS
    from puma_ray.recipes.runs import write_report
    for job in ("train_prompts", "migrate", "sweep", "benchmark", "repair"):
        report = {"methods": {}}
        write_report(str(tmp_path / job / "report.json"), job, report)
        written = json.loads((tmp_path / job / "report.json").read_text())
        assert next(iter(written)) == "format" and written["format"] == f"puma_ray.report/{job}/1" == report["format"]
    assert set(REPORT_FORMATS) == {"train_prompts", "migrate", "sweep", "benchmark", "repair"}
