"""Frozen features of an answer: pooled hidden states of the SFT model, computed once.

The feature reward model (``retrain.head_rm``) is a small head on these.  The SFT model stays
frozen, so an answer's features are one no-grad forward, shared by every head of both
cross-fitted roles, by their evaluation, their normalisation, the gate's judge and PPO's
scoring of rollouts.

An answer's features (``FeatureSpec``), over the *answer span*: the last prompt token (the
opened assistant turn) through the closing end-of-turn token:
- for each layer in ``layers``: the mean of that layer's hidden states over the span;
- with ``last``: the top listed layer's state at the span's last token (the end-of-turn token,
  where a last-token reward model reads);
- with ``length``: log(1 + tokens in the span);
- with ``prompt``: for each layer in ``layers``, the mean of its states over the *prompt* (the
  real tokens before the span), the same at every prefix.  The heads do not read it directly:
  they read its interaction with the answer (``retrain.head_rm.Expand``), for tastes that are a
  relation between the question and the answer (is the answer on topic?).

A *prefix* of an answer has features too: the same quantities over the span so far.  PPO's
critic reads them at every position (``prefix_features``), so the critic starts as the reward
model itself: its value at the end-of-turn token is the reward model's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrain.backbone import decoder_of, encode_with_start, frozen_precision, pad_left, run_layers


@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple[int, ...] = (2, 4, 6, 8, 12, 16, 20, 24)
    """Decoder layers whose states are mean-pooled (1 = the first layer's output; the model's
    layer count = the last layer's).  Layers past the model's depth are clipped to it."""
    last: bool = False
    """Add the top listed layer's state at the end-of-turn token."""
    length: bool = True
    """Add log(1 + answer tokens)."""
    prompt: bool = False
    """Add the prompt's mean-pooled states at ``layers`` (last in the vector), for the heads'
    prompt-answer interaction."""

    def clipped(self, n_layers: int) -> FeatureSpec:
        layers = tuple(sorted({max(1, min(n_layers, int(x))) for x in self.layers}))
        return FeatureSpec(layers=layers, last=self.last, length=self.length, prompt=self.prompt)

    def dim(self, hidden: int) -> int:
        return hidden * (len(self.layers) * (1 + self.prompt) + self.last) + self.length

    def answer_dim(self, hidden: int) -> int:
        """The leading part of the vector that describes the answer alone."""
        return hidden * (len(self.layers) + self.last) + self.length

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "last": self.last, "length": self.length, "prompt": self.prompt}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(layers=tuple(d.get("layers", cls.layers)), last=bool(d.get("last", False)),
                   length=bool(d.get("length", True)), prompt=bool(d.get("prompt", False)))


def layer_states(model, ids: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """Hidden states after each of ``layers`` (no grad, in ``dtype``; returned as fp32), running
    the decoder only as deep as the deepest one."""
    dec = decoder_of(model)
    out, done = {}, 0
    with torch.no_grad(), frozen_precision(dtype, ids.device):
        h = dec.embed_tokens(ids)
        for layer in sorted(layers):
            h = run_layers(dec, h, mask, done, layer)
            done = layer
            out[layer] = h.float()
    return out


def prefix_features(states: dict[int, torch.Tensor], span: torch.Tensor, spec: FeatureSpec,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Features of every prefix of the answer span: [B, T, D], row b position t holding the
    features of span positions ``[start_b, t]`` (zeros before the span).  ``span`` [B, T] is 1
    on the span's positions; ``prompt`` [B, T] is 1 on the prompt's (needed with
    ``spec.prompt``)."""
    span = span.float()
    count = span.cumsum(1)  # [B, T]
    denom = count.clamp(min=1)[..., None]
    parts = [(states[layer] * span[..., None]).cumsum(1) / denom for layer in spec.layers]
    if spec.last:
        parts.append(states[spec.layers[-1]] * span[..., None])
    if spec.length:
        parts.append(torch.log1p(count)[..., None])
    if spec.prompt:
        if prompt is None:
            raise ValueError("spec.prompt: pass the prompt's positions")
        pm = prompt.float()[..., None]
        n = pm.sum(1, keepdim=True).clamp(min=1)
        parts += [((states[layer] * pm).sum(1, keepdim=True) / n).expand_as(states[layer]) for layer in spec.layers]
    return torch.cat(parts, -1) * (count > 0).float()[..., None]


def span_mask(mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[B, T] 1 from each left-padded row's answer start (``starts``: index in the unpadded row)."""
    T = mask.shape[1]
    first = T - mask.sum(-1)  # where each row's real tokens begin
    pos = torch.arange(T, device=mask.device)[None]
    return (pos >= (first + starts)[:, None]).long() * mask


class FeatureCache:
    """Features per encoded answer, computed once (shortest first, in batches) with a frozen
    model, and kept for every head, evaluation and normalisation of a run."""

    def __init__(self, model, tokenizer, spec: FeatureSpec, *, max_length: int = 384, batch: int = 8,
                 dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.max_length, self.batch, self.dtype = max_length, batch, dtype
        self._feats: dict[tuple[int, ...], torch.Tensor] = {}
        self.tokens = 0  # tokens run through the model (cost accounting)

    def encode(self, prompt: list[dict], response: str) -> tuple[tuple[int, ...], int]:
        ids, start = encode_with_start(self.tokenizer, prompt, response, self.max_length)
        return tuple(ids), start

    def get(self, items: list[tuple[list[dict], str]], desc: str = "features") -> torch.Tensor:
        """[N, D] features of (prompt, answer) items."""
        from tqdm.auto import tqdm

        enc = [self.encode(p, r) for p, r in items]
        todo = sorted({e for e in enc if e[0] not in self._feats}, key=lambda e: len(e[0]))
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for j in tqdm(range(0, len(todo), self.batch), desc=desc, leave=False, disable=len(todo) <= self.batch):
            chunk = todo[j:j + self.batch]
            ids, mask = pad_left([list(s) for s, _ in chunk], pad)
            ids, mask = ids.to(device), mask.to(device)
            states = layer_states(self.model, ids, mask, self.spec.layers, self.dtype)
            starts = torch.tensor([s for _, s in chunk], device=device)
            span = span_mask(mask, starts)
            feats = prefix_features(states, span, self.spec, mask - span)[:, -1].cpu()
            self.tokens += int(mask.sum())
            for r, (s, _) in enumerate(chunk):
                self._feats[s] = feats[r].clone()
        if not enc:
            return torch.zeros(0, 0)
        return torch.stack([self._feats[s] for s, _ in enc])
