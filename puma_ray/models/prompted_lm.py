"""A frozen LM read out through a template that holds a user's soft prompt (Eq. 1's M(T(p_u, phi(i)))).

The template is split at its placeholders once; item texts are tokenized once. A record becomes
[bos] + literal + <l prompt slots> + literal + item tokens + ... + answer cue, left padded, so the last position
is always the answer cue. Token embeddings come from the model's own embedding module (with its family scaling),
the prompt vectors are scattered into the slots, and only the label tokens' rows of the output layer are applied
to the last hidden state.

With the prefix cache on (a frozen model: every use but the foundation pretraining), the positions before the
first slot are not recomputed per record: `encode` looks their keys/values up (models/prefix_cache.py) and the
batch holds only the slots and what follows them.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from puma_ray.config import TemplateConfig
from puma_ray.errors import TemplateError
from puma_ray.models.backbone import Backbone, embedding_rms
from puma_ray.models.prefix_cache import DEFAULT_PREFIX_CACHE_MIB, PrefixCache, batch_prefix, fresh_cache

SLOT = -1  # marks a prompt position in a token sequence before embedding
ITEM_TOKEN = "<item:{}>"  # a foundation's entity token of one item (FoundationConfig.item_tokens), before its text
ITEM_TOKEN_PREFIX = ITEM_TOKEN.split("{")[0]


def item_token(item_id: str) -> str:
    return ITEM_TOKEN.format(item_id)


class PromptedLM:
    def __init__(self, backbone: Backbone, template: TemplateConfig, prompt_length: int, item_texts: dict[str, str],
                 prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB):
        self.backbone, self.template, self.l = backbone, template, prompt_length
        self.model, self.tok = backbone.model, backbone.tokenizer
        self.d = backbone.hidden_size
        self.embed_rms = embedding_rms(self.model)
        self.label_ids = self._label_ids(template.labels)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        self._parts = self._split_template(template)
        self._pieces = self.template_pieces()  # what every record's sequence is filled from
        entities = {t: i for t, i in self.tok.get_added_vocab().items() if t.startswith(ITEM_TOKEN_PREFIX)}
        # a tokenizer with an item's entity token (a foundation's): that token, then the text, within the cap
        self._item_tokens = {k: self._item_fill(v, entities.get(item_token(k))) for k, v in item_texts.items()}
        self.item_texts = item_texts  # item id → text (the Ray workers rebuild the same PromptedLM from it)
        self._label_index = torch.tensor(self.label_ids)
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._seq_cache: dict[str, list[int]] = {}
        # 0 turns it off: a model whose weights train (the foundation pretraining) has no fixed prefix
        self.prefix_cache = PrefixCache(self.model, prefix_cache_mib * 2 ** 20) if prefix_cache_mib > 0 else None

    # ---- tokenization ---------------------------------------------------------------------------------------
    def _label_ids(self, labels) -> list[int]:
        ids = []
        for label in labels:
            enc = self.tok.encode(label, add_special_tokens=False)
            if len(enc) != 1:
                raise TemplateError(f"label {label!r} is {len(enc)} tokens for {self.backbone.identity.name}; "
                                    "a label must be one token (its own id is read out)")
            ids.append(enc[0])
        return ids

    def _split_template(self, t: TemplateConfig) -> list[tuple[str, object]]:
        names = {t.user_placeholder: "user", t.item_placeholder: "item", t.history_placeholder: "history"}
        pattern = "(" + "|".join(re.escape(p) for p in names) + ")"
        parts: list[tuple[str, object]] = []
        pieces = re.split(pattern, t.text)
        for i, piece in enumerate(pieces):
            if piece in names:
                parts.append((names[piece], None))
            elif piece:
                nxt = pieces[i + 1] if i + 1 < len(pieces) else None
                # a space before a text slot belongs to the filled text (" Toy Story"), as a tokenizer would see it
                if nxt in (t.item_placeholder, t.history_placeholder) and piece.endswith(" "):
                    piece = piece[:-1]
                parts.append(("text", self.tok.encode(piece, add_special_tokens=False)))
        return parts

    def _item_fill(self, text: str, entity: int | None) -> list[int]:
        if entity is None:
            return self._encode_fill(text, self.template.max_item_tokens, keep="start")
        return [entity] + self._encode_fill(text, self.template.max_item_tokens - 1, keep="start")

    def _encode_fill(self, text: str, max_tokens: int, keep: str) -> list[int]:
        ids = self.tok.encode(" " + text, add_special_tokens=False)
        return ids[:max_tokens] if keep == "start" else ids[-max_tokens:]

    def sequence(self, item_id: str, history: list[str] | None = None) -> list[int]:
        """Token ids of one record with SLOT at the user's prompt positions."""
        if history is None and item_id in self._seq_cache:
            return self._seq_cache[item_id]
        if item_id not in self._item_tokens:
            raise TemplateError(f"item {item_id!r} has no text")
        seq: list[int] = []
        for kind, ids in self._pieces:
            if kind == "text":
                seq += ids
            elif kind == "user":
                seq += [SLOT] * self.l
            elif kind == "item":
                seq += self._item_tokens[item_id]
            else:  # most recent titles that fit: the oldest are cut first, the answer cue never
                titles = "; ".join(self.item_texts.get(h, h) for h in (history or []))
                seq += self._encode_fill(titles, self.template.max_history_tokens, keep="end") if titles else []
        if history is None:
            self._seq_cache[item_id] = seq
        return seq

    def template_pieces(self) -> list[tuple[str, list[int] | None]]:
        """The record's layout in order: ("text", fixed token ids; the bos token leads the first) and the slots
        filled per record, ("user" | "item" | "history", None). `sequence` fills it; the serving export
        (artifacts/serving_splice.py) embeds the fixed pieces once from it."""
        pieces: list[tuple[str, list[int] | None]] = []
        if self.tok.bos_token_id is not None:
            pieces.append(("text", [self.tok.bos_token_id]))
        for kind, ids in self._parts:
            if kind == "text" and pieces and pieces[-1][0] == "text":
                pieces[-1] = ("text", pieces[-1][1] + ids)
            else:
                pieces.append((kind, list(ids) if kind == "text" else None))
        return pieces

    def item_fill(self, item_id: str) -> list[int]:
        """The token ids an item's slot holds (its entity token, if the tokenizer has one, then its text)."""
        if item_id not in self._item_tokens:
            raise TemplateError(f"item {item_id!r} has no text")
        return self._item_tokens[item_id]

    def encode(self, item_ids, histories=None) -> dict[str, torch.Tensor]:
        """A batch for `label_logits`; its "tokens" counts the positions the LLM computes for it."""
        seqs = [self.sequence(i, None if histories is None else list(histories[k])) for k, i in enumerate(item_ids)]
        if self.prefix_cache is not None:
            return self._encode_cached(seqs)
        batch = self._pad(seqs, left=True)  # left padding: the answer cue is the last position of every row
        return {**batch, "tokens": int(batch["attention_mask"].sum())}

    def _pad(self, seqs: list[list[int]], left: bool) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, s in enumerate(seqs):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, cols] = s
            mask[row, cols] = 1
        slots = ids == SLOT
        ids[slots] = self.pad_id
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "slots": torch.from_numpy(slots)}

    def _encode_cached(self, seqs: list[list[int]]) -> dict:
        if self.model.get_input_embeddings().weight.requires_grad:
            raise TemplateError("the prefix cache needs a frozen model: build this PromptedLM with prefix_cache_mib=0 "
                                "to train its weights")
        cut = [s.index(SLOT) for s in seqs]  # the prefix: everything before the first prompt slot
        prefixes = [tuple(s[:c]) for s, c in zip(seqs, cut)]
        built = self.prefix_cache.stats.positions_built
        kv_of = self.prefix_cache.lookup(prefixes)
        prefix_kv, prefix_mask = batch_prefix([kv_of[p] for p in prefixes])
        suffixes = [s[c:] for s, c in zip(seqs, cut)]
        batch = self._pad(suffixes, left=False)  # right padding: pads follow the real tokens, which never see them
        computed = int(batch["attention_mask"].sum()) + self.prefix_cache.stats.positions_built - built
        return {**batch, "tokens": computed, "prefix_kv": prefix_kv,
                "prefix_mask": prefix_mask, "prefix_lengths": torch.tensor(cut),
                "last": torch.tensor([len(s) - 1 for s in suffixes])}

    # ---- forward ----------------------------------------------------------------------------------------------
    def label_logits(self, prompts: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """prompts (B, l, d) at the embedding scale → (B, n_labels) float32 logits at the answer position."""
        out = self.model.get_output_embeddings()
        device = out.weight.device
        # only the label rows of the output layer (the full vocabulary would be pure waste), gathered per call:
        # a few rows, and a foundation being pretrained (recipes/foundation.py) trains them through this readout
        w_label = out.weight[self._label_index.to(device)]
        b_label = out.bias[self._label_index.to(device)] if getattr(out, "bias", None) is not None else None
        ids, mask, slots = (batch[k].to(device) for k in ("input_ids", "attention_mask", "slots"))
        emb = self.model.get_input_embeddings()(ids)
        emb = emb.masked_scatter(slots.unsqueeze(-1), prompts.to(device=device, dtype=emb.dtype))
        if "prefix_kv" in batch:  # cached prefix: positions continue each row's prefix; read at its last real token
            position_ids = batch["prefix_lengths"].to(device).unsqueeze(1) + torch.arange(ids.shape[1], device=device)
            past = {self.prefix_cache.argument: fresh_cache(self.model, batch["prefix_kv"])}
            hidden = self.model.base_model(inputs_embeds=emb, attention_mask=torch.cat([batch["prefix_mask"], mask], 1),
                                           position_ids=position_ids, use_cache=True, **past).last_hidden_state
            hidden = hidden[torch.arange(len(hidden), device=device), batch["last"].to(device)]
        else:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
            hidden = self.model.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids,
                                           use_cache=False).last_hidden_state[:, -1]
        logits = hidden.float() @ w_label.float().T
        if b_label is not None:
            logits = logits + b_label.float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def tokens_per_record(self, item_ids) -> float:
        return float(np.mean([len(self.sequence(i)) for i in item_ids])) if len(item_ids) else 0.0
