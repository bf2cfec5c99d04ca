"""Sampling: one token per row of a batch of logits, each row with its own settings.

Each seeded request draws from its own generator, so its answer does not depend on what
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks only: run to max_new_tokens past end-of-turn

    def as_dict(self) -> dict:
        d = {"temperature": self.temperature, "top_p": self.top_p,
             "max_new_tokens": self.max_new_tokens, "seed": self.seed}
        if self.ignore_eos:
            d["ignore_eos"] = True
        return d



NUCLEUS_TOPK = 128  # top-p looks at the k most likely tokens first; a full sort only if they hold < top_p
NUCLEUS_SLACK = 1e-4  # the nucleus keeps tokens within this relative margin below its floor (float noise)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """Samples one token per row of ``logits`` [B, V], each row with its own parameters.

    Greedy rows (T <= 0) take the argmax.  The others draw by inverse CDF with one uniform
    number from their own generator (so a seed reproduces an answer whatever else is in the
    batch), at their temperature.  For top-p, the smallest probability in the nucleus, less
    ``NUCLEUS_SLACK``, is a floor, and the draw is over every token at or above it.  The
    nucleus is looked for among the ``NUCLEUS_TOPK`` most likely tokens, which avoids
    touching the whole vocabulary per row unless it is wider than that.

    The CDF runs in vocabulary order, not in order of probability.  A batched forward pass
    (llama.cpp's kernels change with the batch) moves logits by ~1e-7; sorted, that reorders
    near-equal tokens and can move the pick to a neighbour, while in vocabulary order it moves
    the CDF by far less than one token's mass, so the seeded answer stays the same.  The slack
    keeps near-ties at the nucleus's edge on the same side of it whichever way noise breaks them.
    """
    n, vocab = logits.shape
    out = [0] * n
    logits = logits.float()
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        rows = logits if len(greedy) == n else logits[greedy]
        for i, tok in zip(greedy, rows.argmax(-1).tolist()):
            out[i] = tok
        if len(greedy) == n:
            return out
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    temps = torch.tensor([[params[i].temperature] for i in hot], dtype=logits.dtype)
    probs = torch.softmax((logits if len(hot) == n else logits[hot]) / temps, dim=-1)
    uniforms = torch.tensor([_uniform(generators[i]) for i in hot], dtype=probs.dtype)[:, None]
    top_p = torch.tensor([[p if 0 < p < 1 else 2.0] for p in (params[i].top_p for i in hot)], dtype=probs.dtype)
    narrow = (top_p[:, 0] < 1).nonzero()[:, 0]
    wide = (top_p[:, 0] >= 1).nonzero()[:, 0].tolist()  # no top-p, or (below) a nucleus beyond the top k
    if len(narrow):  # the nucleus among the top k, drawn over its tokens in vocabulary order
        vals, idx = (probs if len(narrow) == len(hot) else probs[narrow]).topk(min(NUCLEUS_TOPK, vocab), dim=-1)
        floor = _floor(vals, top_p[narrow])
        keep = vals >= floor
        beyond = keep[:, -1] & (vals.shape[1] < vocab)  # the nucleus (or its slack) reaches past the top k
        ids, _ = torch.where(keep, idx, vocab).sort(-1)
        cum = torch.where(ids < vocab, probs[narrow[:, None], ids.clamp(max=vocab - 1)], 0).cumsum(-1)
        pos = torch.searchsorted(cum, uniforms[narrow] * cum[:, -1:], right=True).clamp_(max=ids.shape[1] - 1)
        for j, tok, far in zip(narrow.tolist(), ids.gather(1, pos)[:, 0].tolist(), beyond.tolist()):
            if far:
                wide.append(j)
            else:
                out[hot[j]] = tok
    if wide:  # over the whole vocabulary, with a floor from a full sort where there is top-p
        floor = torch.zeros(len(wide), 1, dtype=probs.dtype)
        for r, j in enumerate(wide):
            if top_p[j, 0] < 1:
                floor[r] = _floor(torch.sort(probs[j], descending=True)[0][None], top_p[j:j + 1])
        sub = probs[wide]
        cum = torch.where(sub >= floor, sub, 0).cumsum(-1)
        picks = torch.searchsorted(cum, uniforms[wide] * cum[:, -1:], right=True).clamp_(max=vocab - 1)
        for j, tok in zip(wide, picks[:, 0].tolist()):
            out[hot[j]] = tok
    return out


def _floor(vals: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, 1] smallest kept probability, less the slack, of rows of probabilities sorted in
    descending order: the last token whose mass before it is under top_p (the top one always)."""
    inside = ((vals.cumsum(-1) - vals) < top_p).sum(-1, keepdim=True)
    return vals.gather(1, inside - 1) * (1 - NUCLEUS_SLACK)
