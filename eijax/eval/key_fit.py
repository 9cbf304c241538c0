"""Could a memory key computed from the layer's hidden state bind a name to its value?

Multi-key recall needs the memory read, at the answer's "... <name> mentioned in the provided text
is", to weigh the asked needle's value tokens above the three other needles' values and the filler.
`memory_probe --task multikey` shows that today's keys (each head's own 64-d pre-RoPE key, mapped
by the memory adapter) do not. This asks whether *any* linear memory key could, and from which input,
before the model is changed:

1. `collect`: stream multi-key documents through the model (as `memory_probe` does, memory on), then
   ask each document for each of its four names in turn (the question and the answer's prefix as the
   query, each in a fresh window after the same memory), and keep per layer: the attention input
   (after the norm) at the query's last token and at the memory's tokens (every needle token and a
   sample of the filler, weighted back to the filler's full count), the mean of the last 16 tokens'
   attention inputs at each of those tokens, and each KV head's adapted key at those tokens. It also records, per layer and query head, how the model's own memory read and a
   softmax over the same q and k split their weight between the four needles' values. One file per
   document, so an interrupted collection resumes where it stopped.
2. `fit`: per layer, learn a query map and a key map (rank r, the memory's kernel σ(Wq x_q)·σ(Wk x_k),
   σ = elu + 1, so the result is a read a d x d memory could hold) on the training samples, maximising
   the share of the read's weight on the asked value's tokens, and score held-out documents. The key's
   input is the layer's hidden state (576-d for SmolLM2), or its mean over the token's last 16
   (the value's own name among them), or every KV head's key (Hkv x d), or their mean over the last
   16 tokens (what a short convolution over the cached keys could give), or one KV head's key (what the
   memory adapter can express); the query's input is always the hidden state.

Scores, per layer, on held-out documents (each asked for all four names): pick = how often the asked
value gets more of the read's weight than each of the other three (chance 0.25), binding = the asked value's selectivity over the
others' mean (geometric mean over samples; 1 = the name does not steer), share = the weight on the
asked value's tokens.

`--kernel softmax` fits exp(q·k/√r) instead, which no fixed-size memory holds but which tells whether
the inputs carry the binding at all, and `--kernel softmax_then_memory` fits the memory's kernel
starting from the softmax fit's maps (from a random start it settles on "digits, not filler");
`--kernel hedgehog` (and `softmax_then_hedgehog`) fits a spiky linear kernel, φ(x) = [softmax(x) ;
softmax(-x)] over the features, that a fixed-size memory could hold in place of σ; `--tied` starts both maps equal (q·k starts as the inputs' own
similarity). docs/memory-training.md has what this measured on SmolLM2.

    python -m eijax.eval.key_fit collect --checkpoint smollm2-memory --length 2000 --samples 120 --out DIR
    python -m eijax.eval.key_fit fit DIR --train 95 --layers 6,10,14,18,22,26 --tied --kernel softmax
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from eijax import cli
from eijax.eval.memory_probe import layer_traces, needle_token_mask, read_weights
from eijax.memory import sigma

CONTEXT = 16  # tokens averaged by the "context" key input (a value's own name sits 6-14 tokens back)
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"


def sample_trace(model, tokenizer, sample: dict[str, Any], filler_keep: int, seed: int) -> dict[str, np.ndarray]:
    """One multi-key document's arrays for `fit` (see the module docstring), read once for each of its
    needles' names (query j asks for needle j); queries at the question's end and at the answer
    prefix's end, in that order."""
    from eijax.data.records import QARecord, render_parts

    queries, n_question = [], []
    for key in sample["keys"]:
        question = sample["instruction"].replace(sample["key"], key)
        parts = render_parts(QARecord(sample["context"], question, ""), tokenizer)
        prefix = list(tokenizer.encode(ANSWER_PREFIX.format(key=key), add_special_tokens=False))
        queries.append(parts.query + prefix)
        n_question.append(len(parts.query))
    traces = layer_traces(model, parts.ctx, queries, hidden=True)
    written = traces[0].written
    values = np.stack([needle_token_mask(tokenizer, parts.ctx, v)[written] for v in sample["values"]])  # [4, T]
    sentences = np.stack([needle_token_mask(tokenizer, parts.ctx, t)[written] for t in sample["needles"]])
    filler = np.flatnonzero(~sentences.any(0))
    rng = np.random.default_rng(seed)
    kept_filler = np.sort(rng.choice(filler, size=min(filler_keep, filler.size), replace=False))
    keep = np.union1d(np.flatnonzero(sentences.any(0)), kept_filler)
    weight = np.where(np.isin(keep, kept_filler), filler.size / max(kept_filler.size, 1), 1.0)
    mass: dict[str, list[np.ndarray]] = {}
    for tr in traces:  # the model's own reads at the answer prefix, over every memory token, per needle value
        for name, w in read_weights(tr.q, tr.k, strength=tr.strength).items():
            mass.setdefault(name, []).append(np.stack([w[..., m].sum(-1) for m in values], -1) / w.sum(-1, keepdims=True))
    tr = traces[0]
    return {"hidden_q": np.stack([np.stack([t.hidden_q[:, n - 1], t.hidden_q[:, -1]], 1)
                                  for t, n in zip(traces, n_question)]).astype(np.float32),  # [4, NL, 2, D]
            "hidden_k": tr.hidden_k[:, keep].astype(np.float16),           # [NL, T', D]
            # over the stream of written tokens, across window folds (the tokens before a value)
            "hidden_ctx": causal_mean(tr.hidden_k, CONTEXT)[:, keep].astype(np.float16),
            "keys": tr.k[:, keep].astype(np.float16),                      # [NL, T', Hkv, d], adapted
            # the same causal mean over the KV heads' adapted keys (what a conv over the cached keys sees)
            "keys_ctx": causal_mean(tr.k.reshape(*tr.k.shape[:2], -1), CONTEXT)[:, keep].astype(np.float16),
            "values": values[:, keep], "weight": weight.astype(np.float32),
            "value_tokens": values.sum(1), "written": np.int64(written.sum()),
            "mass_mem": np.stack(mass["mem"]), "mass_soft": np.stack(mass["soft"])}  # [4 queries, NL, H, 4]


def causal_mean(x: np.ndarray, n: int) -> np.ndarray:
    """x [L, T, D] -> the mean of x over each position's last n positions (itself included) along T."""
    csum = np.cumsum(x.astype(np.float32), axis=1)
    lagged = np.concatenate([np.zeros_like(csum[:, :n]), csum[:, :-n]], axis=1)[:, :csum.shape[1]]
    return (csum - lagged) / np.minimum(np.arange(1, csum.shape[1] + 1), n)[None, :, None]


def load_traces(folder: Path, n: int | None = None) -> list[dict[str, np.ndarray]]:
    files = sorted(folder.glob("sample_*.npz"))[:n]
    if not files:
        raise cli.MissingInput(f"no sample_*.npz in {folder} (run `collect` first)")
    traces = [dict(np.load(f)) for f in files]
    if traces[0]["hidden_q"].ndim != 4 or "hidden_ctx" not in traces[0]:
        raise cli.InputError(f"{folder} was collected by an older key_fit: collect it again")
    return traces


def scores(mass: np.ndarray, value_tokens: np.ndarray, written: np.ndarray) -> dict[str, np.ndarray]:
    """From the read's weight share on each needle's value [N, ..., 4] (asked first), its tokens
    [N, 4] and the memory's token count [N]: pick (the asked value outweighs each other one, mean over
    samples), binding (geometric mean of selectivity ratios) and share (mean)."""
    extra = (1,) * (mass.ndim - 2)
    sel = mass / (value_tokens.reshape(value_tokens.shape[:1] + extra + (-1,)) / written.reshape((-1,) + extra + (1,)))
    pick = (mass[..., :1] > mass[..., 1:]).all(-1).mean(0)
    binding = np.exp(np.mean(np.log(sel[..., 0] / sel[..., 1:].mean(-1)), axis=0))
    return {"pick": pick, "binding": binding, "share": mass[..., 0].mean(0)}


def document_scores(mass: np.ndarray, traces: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`scores` over every (document, asked name): mass [N, J, ..., J], query j asking for needle j."""
    n_needles = mass.shape[1]
    orders = [[j] + [i for i in range(n_needles) if i != j] for j in range(n_needles)]
    vt, wr = np.stack([t["value_tokens"] for t in traces]), np.array([t["written"] for t in traces])
    return scores(np.concatenate([mass[:, j][..., o] for j, o in enumerate(orders)]),
                  np.concatenate([vt[:, o] for o in orders]), np.tile(wr, n_needles))


def _inputs(traces: Sequence[dict[str, np.ndarray]], layer: int, source: str, query: int) -> tuple[jax.Array, ...]:
    """Padded arrays of one layer: xq [N, J, Dq] (query j asks for needle j), xk [N, T, Dk], values
    [N, J, T], weight [N, T] (0 = pad)."""
    t = max(tr["weight"].size for tr in traces)

    def pad(a, axis):
        return np.pad(a, [(0, t - a.shape[axis]) if i == axis else (0, 0) for i in range(a.ndim)])

    def key_input(tr):
        if source in ("hidden", "context", "heads_context"):
            if source == "heads_context" and "keys_ctx" not in tr:
                raise cli.InputError("--sources heads_context needs a folder collected by this key_fit: collect it again")
            return tr[{"hidden": "hidden_k", "context": "hidden_ctx", "heads_context": "keys_ctx"}[source]][layer]
        keys = tr["keys"][layer]
        return keys.reshape(keys.shape[0], -1) if source == "heads" else keys[:, int(source.removeprefix("head"))]

    xq = np.stack([tr["hidden_q"][:, layer, query] for tr in traces])
    xk = np.stack([pad(key_input(tr).astype(np.float32), 0) for tr in traces])
    values = np.stack([pad(tr["values"], 1) for tr in traces])
    weight = np.stack([pad(tr["weight"], 0) for tr in traces])
    return jnp.asarray(xq), jnp.asarray(xk), jnp.asarray(values), jnp.asarray(weight)


KERNELS = ("memory", "softmax", "hedgehog", "softmax_then_memory", "softmax_then_hedgehog")


def hedgehog(x: jax.Array) -> jax.Array:
    """[..., r] -> [..., 2r]: softmax over the features of x and of -x (positive, sums to 2)."""
    return jnp.concatenate([jax.nn.softmax(x, axis=-1), jax.nn.softmax(-x, axis=-1)], axis=-1)


def _value_mass(params, xq, xk, values, weight, kernel: str = "memory") -> jax.Array:
    """The read's weight share on each needle's value [N, J (query), J (needle)] under the learned maps:
    the memory's kernel σ(q)·σ(k); ("softmax") exp(q·k/√r), which no fixed-size memory holds but
    which tells whether the inputs carry the binding at all; or ("hedgehog") φ(q)·φ(k) with
    φ(x) = [softmax(x) ; softmax(-x)] over the r features (Zhang et al. 2024), a spiky kernel a
    fixed-size memory holds with 2r features."""
    q, k = xq @ params["wq"] + params["bq"], xk @ params["wk"] + params["bk"]     # [N, J, r], [N, T, r]
    if kernel == "softmax":
        logits = jnp.einsum("njr,ntr->njt", q, k) / jnp.sqrt(q.shape[-1]) + jnp.log(weight)[:, None]
        w = jax.nn.softmax(logits, axis=-1)
    else:
        phi = sigma if kernel == "memory" else hedgehog
        w = jnp.einsum("njr,ntr->njt", phi(q), phi(k)) * weight[:, None]
    return jnp.einsum("njt,nkt->njk", w, values.astype(w.dtype)) / w.sum(-1, keepdims=True)


def fit_layer(train: tuple[jax.Array, ...], rank: int, steps: int, lr: float, seed: int,
              kernel: str = "memory", tied: bool = False, init: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Query and key maps maximising the mean log share of the asked value in the training samples
    (starting from `init` when given)."""
    xq, xk = train[0], train[1]
    # tied: one random projection for both sides (inputs of one width), so q·k starts as the inputs'
    # own similarity (content matching) instead of noise
    tied = tied and xq.shape[-1] == xk.shape[-1]
    kq, kk = jax.random.split(jax.random.key(seed))
    params = {"wq": jax.random.normal(kq, (xq.shape[-1], rank)) / jnp.sqrt(xq.shape[-1]) / jnp.std(xq),
              "bq": jnp.zeros(rank),
              "wk": jax.random.normal(kq if tied else kk, (xk.shape[-1], rank)) / jnp.sqrt(xk.shape[-1]) / jnp.std(xk),
              "bk": jnp.zeros(rank)} if init is None else init
    opt = optax.adamw(lr, weight_decay=1e-4)

    def loss(p):
        return -jnp.log(jnp.diagonal(_value_mass(p, *train, kernel), axis1=1, axis2=2) + 1e-12).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def fit(traces: Sequence[dict[str, np.ndarray]], n_train: int, sources: Sequence[str], rank: int = 64,
        steps: int = 300, lr: float = 3e-3, query: int = 1, seed: int = 0,
        layers: Sequence[int] | None = None, kernel: str = "memory", tied: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Per source, per layer: held-out and training `scores` of the fitted read ([NL] each, named
    "<score>" and "train_<score>")."""
    train, test = traces[:n_train], traces[n_train:]
    if not train or not test:
        raise cli.InputError(f"{len(traces)} samples cannot give {n_train} to train and some held out")
    layers = range(traces[0]["hidden_k"].shape[0]) if layers is None else layers
    out: dict[str, dict[str, list]] = {}
    for source in sources:
        acc: dict[str, list] = {}
        for layer in tqdm(list(layers), desc=f"fit {source}", unit="layer"):
            tr_in, te_in = _inputs(train, layer, source, query), _inputs(test, layer, source, query)
            read = kernel.removeprefix("softmax_then_")
            if read != kernel:  # a linear kernel, started where the softmax fit ended
                params = fit_layer(tr_in, rank, steps, lr, seed, "softmax", tied)
                params = fit_layer(tr_in, rank, steps, lr, seed, read, init=params)
            else:
                params = fit_layer(tr_in, rank, steps, lr, seed, kernel, tied)
            for prefix, part, inp in (("", test, te_in), ("train_", train, tr_in)):
                got = document_scores(np.asarray(_value_mass(params, *inp, read)), part)
                for name, v in got.items():
                    acc.setdefault(prefix + name, []).append(v)
        out[source] = {name: np.asarray(v) for name, v in acc.items()}
    return out


def collect(model, tokenizer, folder: Path, n: int, length: int, seed: int, filler_keep: int) -> None:
    """Write sample_<i>.npz for samples 0..n-1 of `seed` that are not there yet."""
    from eijax.data.synthetic import Filler, make_sample

    folder.mkdir(parents=True, exist_ok=True)
    filler = Filler.for_tokenizer(tokenizer)
    for i in tqdm(range(n), desc="collect", unit="sample"):
        path = folder / f"sample_{i:04d}.npz"
        if path.exists():
            continue
        sample = make_sample("multikey", i, seed=seed, tokenizer=tokenizer, context_tokens=length, filler=filler)
        arrays = sample_trace(model, tokenizer, sample, filler_keep, seed=i)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)  # a sample file is whole or absent


def report(traces: Sequence[dict[str, np.ndarray]], n_train: int, fitted: dict[str, dict[str, np.ndarray]],
           layers: Sequence[int]) -> str:
    """The table: per layer, the model's own reads (best head, held-out samples) and each fitted read."""
    from eijax.eval.report import wilson_interval

    test = traces[n_train:]
    n_reads = len(test) * test[0]["values"].shape[0]  # reads scored: every held-out document, every name
    own = {name: document_scores(np.stack([t[f"mass_{name}"] for t in test]), test) for name in ("mem", "soft")}
    cols = ["memory read", "softmax"] + [f"fit: {s}" for s in fitted]
    lines = [f"held-out documents: {len(test)}, each asked for its {test[0]['values'].shape[0]} names (trained on "
             f"{n_train}); pick = the asked value outweighs each other needle's (chance 1/{test[0]['values'].shape[0]}) "
             f"[95% Wilson interval over the {n_reads} reads]; binding: 1 = the name does not steer; the model's own "
             f"reads (at the answer prefix): the best query head of the layer, by pick; share: the read's weight on "
             f"the asked value (its tokens are ~{np.mean([t['value_tokens'].mean() / t['written'] for t in test]):.4f} of the memory's)",
             "| layer | " + " | ".join(f"{c} pick / binding" + (" / share" if c.startswith("fit") else "")
                                        for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for i, layer in enumerate(layers):
        cells = []
        for name in ("mem", "soft"):
            h = int(np.argmax(own[name]["pick"][layer]))
            cells.append(f"{own[name]['pick'][layer, h]:.2f} / {own[name]['binding'][layer, h]:.2f}")
        for f in fitted.values():
            lo, hi = wilson_interval(f["pick"][i] * n_reads, n_reads)
            cells.append(f"{f['pick'][i]:.2f} [{lo:.2f}, {hi:.2f}] / {f['binding'][i]:.2f} / {f['share'][i]:.3f} "
                         f"(train pick {f['train_pick'][i]:.2f})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    from eijax.generate import add_model_args, load_for_cli

    p = cli.ArgumentParser(prog="python -m eijax.eval.key_fit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="stream multi-key samples and keep what `fit` needs (resumable)")
    add_model_args(c, geometry=(32, 256))
    c.add_argument("--length", type=int, default=2000, help="context tokens")
    c.add_argument("--samples", type=int, default=160, help="documents (each is asked for all its names)")
    c.add_argument("--seed", type=int, default=5151, help="sample seed (keep it apart from eval's 4242)")
    c.add_argument("--filler-keep", type=int, default=192, help="filler tokens kept per sample (weighted back)")
    c.add_argument("--out", required=True, help="folder for sample_<i>.npz")
    f = sub.add_parser("fit", help="learn query and key maps per layer and score held-out samples")
    f.add_argument("folder")
    f.add_argument("--train", type=int, default=128, help="the first N documents train, the rest are held out")
    f.add_argument("--sources", default="hidden,context,heads,head0,head1,head2",
                   help="key inputs: hidden (the layer's attention input), context (its mean over the last "
                        "16 tokens), heads (every KV head's key), heads_context (their mean over the last 16 "
                        "tokens), headG (KV head G's)")
    f.add_argument("--query", default="answer", choices=("answer", "question"),
                   help="query token: the answer prefix's last ('... text is') or the question's last")
    f.add_argument("--layers", default="", help="comma list (default: all)")
    f.add_argument("--rank", type=int, default=64, help="features of the fitted read (the memory's d)")
    f.add_argument("--kernel", default="memory", choices=KERNELS,
                   help="the fitted read: the memory's σ(q)·σ(k), softmax (is the binding in the inputs at all?), "
                        "hedgehog ([softmax(x); softmax(-x)] features, 2 x rank), or softmax_then_<linear "
                        "kernel>: that kernel started from the softmax fit's maps")
    f.add_argument("--tied", action="store_true",
                   help="start the query and key maps equal (where both inputs are hidden states): q·k starts "
                        "as their own similarity")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    if a.command == "collect":
        model, tok = load_for_cli(a)
        collect(model, tok, Path(a.out), a.samples, a.length, a.seed, a.filler_keep)
        return
    traces = load_traces(Path(a.folder))
    n_layers = traces[0]["hidden_k"].shape[0]
    layers = [int(x) for x in a.layers.split(",") if x] or list(range(n_layers))
    if any(not 0 <= x < n_layers for x in layers):
        raise cli.InputError(f"--layers must lie in 0..{n_layers - 1}")
    fitted = fit(traces, a.train, a.sources.split(","), a.rank, a.steps, a.lr,
                 query=1 if a.query == "answer" else 0, layers=layers, kernel=a.kernel, tied=a.tied)
    print(report(traces, a.train, fitted, layers))


if __name__ == "__main__":
    main()
