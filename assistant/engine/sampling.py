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


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """Samples one token per row of ``logits`` [B, V], each row with its own parameters.

    Greedy rows (T <= 0) take the argmax.  The others draw by inverse CDF with one uniform
    number from their own generator (so a seed reproduces an answer whatever else is in the
    batch): softmax at their temperature, then, for top-p, the nucleus found among the
    ``NUCLEUS_TOPK`` most likely tokens, which avoids sorting the whole vocabulary per row
    unless the nucleus is wider than that.
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
    uniforms = [_uniform(generators[i]) for i in hot]
    nucleus = [j for j, i in enumerate(hot) if 0 < params[i].top_p < 1]
    full = [j for j, i in enumerate(hot) if not 0 < params[i].top_p < 1]
    if full:
        cum = probs[full].cumsum(-1)
        target = torch.tensor(uniforms, dtype=cum.dtype)[full, None] * cum[:, -1:]
        picks = torch.searchsorted(cum, target, right=True).clamp_(max=vocab - 1)[:, 0].tolist()
        for j, tok in zip(full, picks):
            out[hot[j]] = tok
    if nucleus:
        top_p = torch.tensor([[params[hot[j]].top_p] for j in nucleus], dtype=probs.dtype)
        sub = probs[nucleus]
        vals, idx = sub.topk(min(NUCLEUS_TOPK, vocab), dim=-1)
        cum = vals.cumsum(-1)
        wide = set((cum[:, -1] < top_p[:, 0]).nonzero()[:, 0].tolist())  # nucleus beyond the top k
        for r in wide:
            out[hot[nucleus[r]]] = _nucleus_one(sub[r], float(top_p[r, 0]), uniforms[nucleus[r]])
        keep = (cum - vals) < top_p  # always keeps the top token
        kept = (vals * keep).cumsum(-1)
        target = torch.tensor([uniforms[j] for j in nucleus], dtype=kept.dtype)[:, None] * kept[:, -1:]
        pos = torch.searchsorted(kept, target, right=True).clamp_(max=vals.shape[1] - 1)
        picks = idx.gather(1, pos)[:, 0].tolist()
        for r, (j, tok) in enumerate(zip(nucleus, picks)):
            if r not in wide:
                out[hot[j]] = tok
    return out


def _nucleus_one(probs: torch.Tensor, top_p: float, u: float) -> int:
    vals, order = torch.sort(probs, descending=True)
    cum = vals.cumsum(-1)
    kept = (vals * ((cum - vals) < top_p)).cumsum(-1)
    pos = int(torch.searchsorted(kept, kept[-1:] * u, right=True).clamp_(max=len(vals) - 1))
    return int(order[pos])

