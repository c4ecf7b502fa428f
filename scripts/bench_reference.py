#!/usr/bin/env python
"""The compact switch reference (optim.reference_dtype=int4) against the exact fp32 one, on real gradient sequences.

    python scripts/bench_reference.py                       # llama_60m-like layers (512 x 1376, r = 128), ~10 min
    python scripts/bench_reference.py --dim 64 --ffn 172 --rank 8 --steps 120   # small, ~1 min
    python scripts/bench_reference.py --bytes-only          # the reference's bytes at 60M / 1B / 7B shapes

A small LLaMA trains with AdamW on the embedded corpus (bytes as tokens); every step's gradients of its projected
matrices are fed, as a stream (nothing is stored), to one Lotus optimizer per reference form and threshold γ, each
on its own copy of the matrix. Reported per form:

- check agreement: at every check of the exact run, the decision the compact form would take from the same R and the
  same D (D encoded in that form), against the exact decision; and |Δ distance| there;
- switch offsets: the compact form's own run, its switch steps against the exact run's, in checks (η steps).

``naive int4`` is the ablation without the estimator (absmax scale, ‖D̂‖² in place of ‖D‖²): its distance is biased
by about ε²/2 in 1 − cos. Bytes are the reference's over the two fp32 moments' (projected matrices), from
``reference_codes.layout``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lotus_dist.model.llama import Llama, llama_config  # noqa: E402
from lotus_dist.optim import LowRankAdamW  # noqa: E402
from lotus_dist.optim import reference_codes as rc  # noqa: E402
from lotus_dist.optim import subspace as ss  # noqa: E402
from lotus_dist.optim.methods import is_projected  # noqa: E402
from lotus_dist.optim.switching import CHECK, POLICIES  # noqa: E402

FORMS = ("int4", "bf16")
DISPLACEMENT = POLICIES["displacement"]


def corpus_tokens() -> torch.Tensor:
    from lotus_dist.data.corpus import embedded_documents

    return torch.frombuffer(bytearray("\n".join(embedded_documents()).encode("utf-8")), dtype=torch.uint8).long()


def gradient_stream(dim: int, ffn: int, layers: int, steps: int, seq: int = 64, batch: int = 8, seed: int = 0,
                    lr: float = 1e-3, tokens: torch.Tensor | None = None):
    """Yield {name: G} of the projected matrices at every step of an AdamW run of a byte-level LLaMA."""
    torch.manual_seed(seed)
    cfg = llama_config("tiny", vocab_size=256, dim=dim, n_layers=layers, n_heads=max(dim // 64, 2), ffn_dim=ffn,
                       max_seq_len=seq)
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = corpus_tokens() if tokens is None else tokens
    gen = torch.Generator().manual_seed(seed + 1)
    names = [n for n, p in model.named_parameters() if is_projected(n, p)]
    params = dict(model.named_parameters())
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen)
        block = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        loss = model(block[:, :-1], block[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        yield {n: params[n].grad.detach() for n in names}
        opt.step()


def _naive_row(D: torch.Tensor, R: torch.Tensor, side: str) -> list[float]:
    """The ablation: absmax int4 codes, D̂ = q·max|D_j|/7, and ‖D̂‖² in the denominator."""
    Db = D.T if side == "left" else D
    amax = Db.abs().amax(dim=1, keepdim=True).clamp_min(1e-38)
    Dq = torch.round(Db * (rc.LEVELS / amax)) * (amax / rc.LEVELS)
    Dq = Dq.T if side == "left" else Dq
    return [float(R.square().sum()), float((R * Dq).sum()), float(Dq.square().sum())]


class Replay:
    """One Lotus optimizer per (γ, form) over copies of the matrices; ``feed`` steps them all on one step's G."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, gammas, eta: int, forms=FORMS):
        self.forms, self.eta = ("fp32", *forms), eta
        self.opts, self.params, self.bases = {}, {}, {}
        for gamma in gammas:
            for form in self.forms:
                ws = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
                self.params[gamma, form] = ws
                self.opts[gamma, form] = LowRankAdamW(
                    [{"params": list(ws.values()), "rank": rank, "switch": "displacement", "gamma": gamma,
                      "verify_gap": eta, "reference_dtype": form}], lr=1e-3)
                self.bases[gamma, form] = {n: [] for n in shapes}
        self.checks = {(g, f): [] for g in gammas for f in (*forms, "naive int4")}  # (exact, compact, |Δdist|)
        self.step = 0

    def _record_checks(self, gamma, grads):
        opt = self.opts[gamma, "fp32"]
        group = opt.param_groups[0]
        for name, w in self.params[gamma, "fp32"].items():
            st = opt.state.get(w)
            if not st or st["n_bases"] == 0 or DISPLACEMENT.peek(st, group) != CHECK:
                continue
            side = ss.side_for(tuple(w.shape), "std")
            R, D, tau = ss.project(grads[name], st["projector"], side), st["d_init"], st["tau"] + 1
            exact = DISPLACEMENT.statistics(st, group, R).tolist()
            rows = {}
            for form in self.forms[1:]:
                enc = {}
                rc.allocate(enc, tuple(w.shape), side, st["exp_avg"].shape[0 if side == "left" else 1], form,
                            torch.float32, "cpu")
                rc.store(enc, D)
                rows[form] = DISPLACEMENT.statistics(enc, group, R).tolist()
            rows["naive int4"] = _naive_row(D, R, side)
            d0 = DISPLACEMENT.distance(exact)
            for key, row in rows.items():
                d1 = DISPLACEMENT.distance(row)
                decide = [DISPLACEMENT.decide({"tau": tau}, group, x) for x in (exact, row)]
                self.checks[gamma, key].append((*decide, abs(d1 - d0) if None not in (d0, d1) else 0.0))

    def feed(self, grads: dict[str, torch.Tensor]) -> None:
        for (gamma, form), opt in self.opts.items():
            if form == "fp32":
                self._record_checks(gamma, grads)
            for name, w in self.params[gamma, form].items():
                w.grad = grads[name].clone()
            opt.step()
            for name, w in self.params[gamma, form].items():
                self.bases[gamma, form][name].append(opt.state[w]["n_bases"])
        self.step += 1

    def switch_steps(self, gamma, form) -> dict[str, list[int]]:
        out = {}
        for name, seq in self.bases[gamma, form].items():
            out[name] = [t for t in range(1, len(seq)) if seq[t] > seq[t - 1]]
        return out

    def figures(self) -> dict:
        """Per (γ, form): checks, agreement, max/mean |Δdist|; and for the forms with a run: switches, the largest
        offset of a switch from the exact run's (in checks; inf when the counts differ), the exact switch count."""
        out = {}
        for (gamma, key), rows in self.checks.items():
            agree = sum(a == b for a, b, _ in rows)
            errs = [e for _, _, e in rows]
            fig = {"checks": len(rows), "agree": agree / max(len(rows), 1),
                   "max_err": max(errs, default=0.0), "mean_err": sum(errs) / max(len(errs), 1)}
            if key in self.forms:
                exact, got = self.switch_steps(gamma, "fp32"), self.switch_steps(gamma, key)
                offsets = [abs(a - b) / self.eta for n in exact for a, b in zip(exact[n], got[n])]
                same_count = all(len(exact[n]) == len(got[n]) for n in exact)
                fig["switches"] = sum(len(v) for v in exact.values())
                fig["max_offset"] = max(offsets, default=0.0) if same_count else math.inf
            out[gamma, key] = fig
        return out


def bytes_table(sizes=("llama_60m", "llama_1b", "llama_7b"), ranks=(128, 512, 1024), forms=rc.REFERENCE_DTYPES):
    """{(size, r, form): reference bytes / two fp32 moments' bytes} over a model's projected matrices."""
    out = {}
    for size in sizes:
        with torch.device("meta"):
            model = Llama(llama_config(size))
        mats = [tuple(p.shape) for n, p in model.named_parameters() if is_projected(n, p)]
        for r in ranks:
            moments = sum(2 * max(s) * min(r, min(s)) * 4 for s in mats)
            for form in forms:
                ref = sum(rc.reference_bytes(max(s), min(r, min(s)), form) for s in mats)
                out[size, r, form] = ref / moments
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eta", type=int, default=10)
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes-only", action="store_true")
    args = ap.parse_args()

    print("reference bytes / two fp32 moments' bytes (projected matrices):")
    table = bytes_table()
    print(f"{'size':<10} {'r':>5} " + " ".join(f"{f:>7}" for f in rc.REFERENCE_DTYPES))
    for size in ("llama_60m", "llama_1b", "llama_7b"):
        for r in (128, 512, 1024):
            print(f"{size:<10} {r:>5} " + " ".join(f"{table[size, r, f]:>6.1%}" for f in rc.REFERENCE_DTYPES))
    if args.bytes_only:
        return
    torch.set_num_threads(1)
    stream = gradient_stream(args.dim, args.ffn, args.layers, args.steps, seed=args.seed)
    first = next(stream)
    replay = Replay({n: tuple(g.shape) for n, g in first.items()}, args.rank, args.gammas, args.eta)
    replay.feed(first)
    for grads in stream:
        replay.feed(grads)
    print(f"\n{len(first)} matrices ({', '.join(sorted({f'{m}x{n}' for m, n in (g.shape for g in first.values())}))}),"
          f" r = {args.rank}, {args.steps} steps, eta = {args.eta}")
    print(f"{'gamma':>6} {'form':<11} {'checks':>6} {'agree':>7} {'max|Δd|':>9} {'mean|Δd|':>9} {'switches':>8} "
          f"{'max offset (checks)':>19}")
    for (gamma, key), f in replay.figures().items():
        print(f"{gamma:>6} {key:<11} {f['checks']:>6} {f['agree']:>7.1%} {f['max_err']:>9.2e} {f['mean_err']:>9.2e} "
              f"{f.get('switches', ''):>8} {f.get('max_offset', ''):>19}")


if __name__ == "__main__":
    main()
