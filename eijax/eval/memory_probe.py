"""What the memory read returns for a needle: how much of the read's weight lands on the needle's
tokens, against the weight softmax attention would give them with the same q and k.

For a passkey sample laid out as in S-SFT (context streams through sink + segments, the question
starts a fresh window), the model runs segment by segment, layer by layer, recording every layer's
pre-RoPE q of the question's last token (the one that predicts the answer) and the keys the memory
holds (memory-path adapter maps applied where the model has them). Per layer and query head:

    share_mem   = Σ_needle β_t σ(q)·σ(k_t) / Σ_all β_t σ(q)·σ(k_t)   (σ = elu + 1, β_t the learned
                                                                 write strength or 1: the memory's read
                                                                 weights; exact for the linear rule)
    share_soft  = Σ_needle exp(q·k_t/√d) / Σ_all exp(q·k_t/√d)  (softmax over the same keys, no RoPE)
    selectivity = share / (needle tokens / memory tokens)       (1 = no better than uniform)

A memory that can recall the needle needs selectivity well above 1 in some head of some layer.

For a multi-key sample (`--task multikey`: four needles "The special magic number for <name> is
<value>.", the question names one) the probe asks whether the name in the question steers the read:
per layer and query head, the selectivity of the asked needle over the mean selectivity of the three
others,

    binding = selectivity(asked) / mean_j selectivity(other needle j)   (1 = the name does not steer)

for the memory read, for softmax over the same q and k, and (`--favor m`) for a read through m
positive random features, softmax's kernel in a form a fixed-size memory could hold; and the mean
write strength β on the asked needle's tokens and on the other needles'.

    python -m eijax.eval.memory_probe --model smollm2 --length 400 --samples 8 [--checkpoint C]
    python -m eijax.eval.memory_probe --checkpoint smollm2-memory --task multikey --length 2000
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eijax import cli
from eijax.layers import adapt
from eijax.memory import Memory, conv_keys, sigma, write_strength


def _char_spans(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for i in ids:
        n = len(tokenizer.decode([i]))
        spans.append((pos, pos + n))
        pos += n
    return spans


def needle_token_mask(tokenizer, ids: Sequence[int], needle: str) -> np.ndarray:
    """Tokens of `ids` whose decoded characters overlap the first occurrence of `needle`."""
    text = "".join(tokenizer.decode([i]) for i in ids)
    start = text.find(needle)
    if start < 0:
        raise ValueError("needle not found in the decoded context")
    end = start + len(needle)
    return np.array([a < end and b > start for a, b in _char_spans(tokenizer, ids)])


@functools.partial(jax.jit, static_argnums=0)  # compiled once per graph and input length, for every layer and call
def _block(graph, p, i, x, state, valid, cos, sin):
    """One layer (i's slices taken inside: eager slicing dispatch is slow): its output, new k/v, the
    last token's pre-RoPE q and the attention input."""
    blk = nnx.merge(graph, p)
    h = blk.attn_norm(x)
    q, _, _ = blk.project_qkv(h)
    x, k, v = blk(x, state.k[i], state.v[i], valid, state.fill, Memory(state.memory.M[i], state.memory.z[i]),
                  state.written, cos, sin)
    return x, k, v, q[0, -1], h[0]


class Trace(NamedTuple):
    """What the memory holds after a context, and what reads it (numpy, pre-RoPE, memory-adapter maps applied).

    q [NL, H, d]: the query's last token; k [NL, T, Hkv, d]: the memory's tokens; strength [NL, T, Hkv]:
    each token's write strength β (1 without a write gate); written [len(ctx)] bool: which ctx
    positions went to memory; hidden_q [NL, Tq, D] (every query token) and hidden_k [NL, T, D]: each
    layer's attention input (after its norm), only with `hidden=True` (else None)."""
    q: np.ndarray
    k: np.ndarray
    strength: np.ndarray
    written: np.ndarray
    hidden_q: np.ndarray | None = None
    hidden_k: np.ndarray | None = None


def layer_qk(model, ctx: Sequence[int], query: Sequence[int], hidden: bool = False) -> Trace:
    """Run ctx (sink + segments, memory on) then the query in a fresh window, layer by layer."""
    return layer_traces(model, ctx, [query], hidden)[0]


def layer_slices(model) -> tuple[Any, list, jax.Array, jax.Array]:
    """(graph of one layer, each layer's params, RoPE cos, sin): what the per-layer jitted blocks of the
    probes take, sliced once (eager slicing per call is slow)."""
    graph, params = nnx.split(model.blocks)
    cos, sin = model._rope()
    return graph, [jax.tree.map(lambda a, i=i: a[i], params) for i in range(model.config.n_layers)], cos, sin


def layer_traces(model, ctx: Sequence[int], queries: Sequence[Sequence[int]], hidden: bool = False) -> list[Trace]:
    """`layer_qk` for several queries, each in a fresh window after the same streamed ctx (run once)."""
    mem = model.memory_config
    s, w = mem.sink, mem.window
    graph, layer_params, cos, sin = layer_slices(model)
    n_layers = model.config.n_layers

    def run(state, ids):
        x = model.embed_tokens(jnp.asarray([ids]))
        t = len(ids)
        valid = jax.lax.dynamic_update_slice(state.valid, jnp.ones((1, t), bool), (0, int(state.fill)))
        ks, vs, qs, hs = [], [], [], []
        for i in range(n_layers):
            x, k_i, v_i, q, h = _block(graph, layer_params[i], i, x, state, valid, cos, sin)
            qs.append(q)
            hs.append(h)
            ks.append(k_i)
            vs.append(v_i)
        return (jnp.stack(qs), np.asarray(jnp.stack(hs)) if hidden else None,
                state._replace(k=jnp.stack(ks), v=jnp.stack(vs), valid=valid, fill=state.fill + t))

    state = model.init_state(1)
    keys, values, hiddens, written = [], [], [], np.zeros(len(ctx), bool)
    if s:
        _, _, state = run(state, list(ctx[:s]))
    for at in range(s, len(ctx), w):
        seg = list(ctx[at:at + w])
        _, h, state = run(state._replace(fill=jnp.asarray(s, jnp.int32)), seg)
        keys.append(state.k[:, 0, s:s + len(seg)])
        values.append(state.v[:, 0, s:s + len(seg)])
        hiddens.append(h)
        written[at:at + len(seg)] = True
        state = model.compress(state)
    k, v = jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
    if model.blocks.key_conv is not None:  # the keys the memory was written with (MemoryConfig.key_conv)
        n_hist = mem.key_conv - 1
        conv = lambda ki, taps: conv_keys(ki[None], jnp.ones((1, ki.shape[0]), bool), taps,
                                          jnp.zeros((1, n_hist, *ki.shape[1:]), ki.dtype), jnp.zeros((1, n_hist), bool))[0][0]
        k = jax.vmap(conv)(k, model.blocks.key_conv.taps[...])
    adapter = model.blocks.memory_adapter
    if adapter is not None:
        k, v = (jax.vmap(lambda xi, m: adapt(xi[None], m)[0])(x, maps) for x, maps in ((k, adapter.k[...]),
                                                                                       (v, adapter.v[...])))
    gate = model.blocks.write_gate
    strength = (jnp.ones(k.shape[:-1]) if gate is None else
                jax.vmap(lambda ki, vi, w, b: write_strength(w, b, ki[None], vi[None])[0])(k, v, gate.w[...], gate.b[...]))
    k, strength, hidden_k = np.asarray(k), np.asarray(strength), np.concatenate(hiddens, axis=1) if hidden else None
    out = []
    for query in queries:
        q, h_query, _ = run(state._replace(fill=jnp.asarray(s, jnp.int32)), list(query))
        if adapter is not None:
            q = jax.vmap(lambda qi, m: adapt(qi[None, None], m)[0, 0])(q, adapter.q[...])
        out.append(Trace(np.asarray(q), k, strength, written, h_query, hidden_k))
    return out


def favor_weights(q: np.ndarray, kk: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Read weights φ(q)·φ(k) [NL, H, T] of `m` positive orthogonal random features (Performer's
    FAVOR+), an unbiased estimate of softmax's exp(q·k/√d) that a fixed-size linear memory could
    hold (M would be m x d per KV head). q [NL, H, d], kk [NL, T, H, d]; float64, stabilised per
    query and per (layer, head) over the keys, constants that cancel in every share."""
    d = q.shape[-1]
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-m // d)):  # d orthogonal directions per block, Haar-uniform (R's signs fixed), Gaussian lengths
        o, r = np.linalg.qr(rng.standard_normal((d, d)))
        blocks.append((o * np.sign(np.diag(r))).T)
    w = np.concatenate(blocks)[:m] * np.linalg.norm(rng.standard_normal((m, d)), axis=1, keepdims=True)

    def log_phi(x):  # log of exp(w·x' - |x'|²/2), x' = x / d^(1/4)
        x = x.astype(np.float64) / d ** 0.25
        return x @ w.T - (x ** 2).sum(-1, keepdims=True) / 2

    out = np.empty(q.shape[:2] + kk.shape[1:2])
    for layer in range(q.shape[0]):  # one layer at a time: [T, H, m] in float64 is large
        lq, lk = log_phi(q[layer]), log_phi(kk[layer])              # [H, m], [T, H, m]
        fq = np.exp(lq - lq.max(-1, keepdims=True))
        fk = np.exp(lk - lk.max(axis=(0, 2), keepdims=True))
        out[layer] = np.einsum("hm,thm->ht", fq, fk)
    return out


def read_weights(q: np.ndarray, k: np.ndarray, temperatures: Sequence[float] = (),
                 strength: np.ndarray | None = None, favor: Sequence[int] = (),
                 favor_seed: int = 0) -> dict[str, np.ndarray]:
    """Per read, its weight on every memory token [NL, H, T]: "mem" (σ(q)·σ(k) x β, the memory's own
    read), "soft" (softmax over the same q and k), "mem_b<β>" for each of `temperatures` (σ(βq)·σ(βk):
    elu+1's constant offset gives every key a similarity of ~d, which a larger β makes small against
    the q/k-dependent part), "favor<m>" for each of `favor` (`favor_weights` x β).
    q [NL, H, d], k [NL, T, Hkv, d], strength [NL, T, Hkv] (the write strengths β_t; None: 1)."""
    nl, h, d = q.shape
    group = h // k.shape[2]
    kk = k[:, :, np.arange(h) // group]                       # [NL, T, H, d]: head h reads KV head h // G
    written = np.ones(kk.shape[:-1]) if strength is None else strength[:, :, np.arange(h) // group]  # [NL, T, H]

    def linear(beta: float) -> np.ndarray:
        return np.einsum("lhd,lthd,lth->lht", np.asarray(sigma(jnp.asarray(beta * q))),
                         np.asarray(sigma(jnp.asarray(beta * kk))), written)

    logits = np.einsum("lhd,lthd->lht", q, kk) / np.sqrt(d)
    return {"mem": linear(1.0), "soft": np.exp(logits - logits.max(-1, keepdims=True)),
            **{f"mem_b{b:g}": linear(b) for b in temperatures},
            **{f"favor{m}": favor_weights(q, kk, m, favor_seed) * written.transpose(0, 2, 1) for m in favor}}


def needle_shares(q: np.ndarray, k: np.ndarray, needle: np.ndarray, temperatures: Sequence[float] = (),
                  strength: np.ndarray | None = None, favor: Sequence[int] = (),
                  weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per layer and query head, for each read of `read_weights` (or of `weights`, computed once):
    its weight on the needle tokens (needle [T] bool) and their selectivity (share / uniform share)."""
    weights = read_weights(q, k, temperatures, strength, favor) if weights is None else weights
    out = {}
    for name, wts in weights.items():
        share = wts[..., needle].sum(-1) / wts.sum(-1)
        out[f"share_{name}"] = share
        out[f"selectivity_{name}"] = share / needle.mean()
    return out


def binding(q: np.ndarray, k: np.ndarray, needles: Sequence[np.ndarray], asked: int,
            strength: np.ndarray | None = None, favor: Sequence[int] = (),
            favor_seed: int = 0, weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per layer and query head [NL, H]: the asked needle's selectivity over the mean of the other
    needles' (1 = the question's name does not steer the read), for the memory read, softmax and
    `favor` random-feature reads (or every read of `weights`, computed once)."""
    weights = read_weights(q, k, (), strength, favor, favor_seed) if weights is None else weights
    sel = [needle_shares(q, k, m, weights=weights) for m in needles]
    others = [j for j in range(len(needles)) if j != asked]
    return {f"binding_{name}": sel[asked][f"selectivity_{name}"] /
            np.mean([sel[j][f"selectivity_{name}"] for j in others], axis=0) for name in weights}


def probe(model, tokenizer, samples: Sequence[dict[str, Any]], temperatures: Sequence[float] = (),
          question_position: str = "last", favor: Sequence[int] = (), favor_seed: int = 0) -> dict[str, np.ndarray]:
    """Mean over samples of `needle_shares` for the asked needle (its whole sentence), of the mean
    write strength β on its tokens and on the rest ([NL, Hkv] each), and for multi-key samples of
    `binding` (a geometric mean: softmax's ratios span many orders of magnitude) and of β on the
    other needles' tokens."""
    from eijax.generate import prompt_parts

    acc: dict[str, list[np.ndarray]] = {}
    for s in samples:
        ctx, query = prompt_parts(tokenizer, s["instruction"], s["context"], question_position)
        q, k, strength, written, *_ = layer_qk(model, ctx, query)
        asked = s["keys"].index(s["key"]) if s["task"] == "multikey" else 0
        masks = [needle_token_mask(tokenizer, ctx, t)[written] for t in s["needles"]]
        needle = masks[asked]
        weights = read_weights(q, k, temperatures, strength, favor if len(masks) > 1 else (), favor_seed)
        stats = needle_shares(q, k, needle, weights=weights)
        stats.update(strength_needle=strength[:, needle].mean(1), strength_rest=strength[:, ~needle].mean(1))
        if len(masks) > 1:
            other = np.any([m for j, m in enumerate(masks) if j != asked], axis=0)
            logs = {name: np.log(v) for name, v in binding(q, k, masks, asked, weights=weights).items()}
            stats.update(logs, strength_other_needles=strength[:, other].mean(1))
        for name, v in stats.items():
            acc.setdefault(name, []).append(v)
    return {name: np.exp(np.mean(v, axis=0)) if name.startswith("binding_") else np.mean(v, axis=0)
            for name, v in acc.items()}


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> None:
    from eijax.data.synthetic import Filler, make_sample
    from eijax.generate import add_model_args, load_for_cli

    p = cli.ArgumentParser(prog="python -m eijax.eval.memory_probe", description=__doc__.split("\n\n")[0])
    add_model_args(p, geometry=(32, 256))
    p.add_argument("--task", default="passkey", choices=("passkey", "multikey"),
                   help="multikey adds whether the question's name steers the read (binding)")
    p.add_argument("--question-position", default="last", choices=("last", "both"),
                   help="the question after the document only, or also before it (S-SFT's question-both)")
    p.add_argument("--favor", default="", help="multikey: also bind through m positive random features "
                                               "(a softmax-like read a fixed-size memory could hold), comma list of m")
    p.add_argument("--favor-seed", type=int, default=0, help="draw of the random features (their noise is large)")
    p.add_argument("--length", type=int, default=400, help="context tokens (the needle goes to memory)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--temperatures", default="4,16", help="extra σ(βx) feature-map scales to compare (comma list)")
    a = p.parse_args(argv)
    temps = [float(t) for t in a.temperatures.split(",") if t]
    model, tok = load_for_cli(a)
    filler = Filler.for_tokenizer(tok)
    samples = [make_sample(a.task, i, seed=a.seed, tokenizer=tok, context_tokens=a.length, filler=filler)
               for i in range(a.samples)]
    favor = [int(m) for m in a.favor.split(",") if m]
    res = probe(model, tok, samples, temps, a.question_position, favor, a.favor_seed)
    print(f"needle selectivity per layer (share of weight on the needle / uniform share), {a.samples} samples, "
          f"context {a.length}, sink {a.sink}, window {a.window}:")
    print(f"{'layer':>5} {'mem max':>8} {'mem mean':>9} {'soft max':>9} {'soft mean':>10}")
    sm, ss = res["selectivity_mem"], res["selectivity_soft"]
    for layer in range(sm.shape[0]):
        print(f"{layer:>5} {sm[layer].max():>8.2f} {sm[layer].mean():>9.2f} {ss[layer].max():>9.2f} "
              f"{ss[layer].mean():>10.2f}")
    print(f"best head overall: memory read {sm.max():.2f}, softmax {ss.max():.2f}" + "".join(
        f", memory read with feature scale {t:g} {res[f'selectivity_mem_b{t:g}'].max():.2f}" for t in temps))
    if model.memory_config.write_gate:
        sn, sr = res["strength_needle"], res["strength_rest"]
        print("write strength β (mean over KV heads), needle tokens / the rest, per layer: " + ", ".join(
            f"{i}: {n:.2f}/{r:.2f}" for i, (n, r) in enumerate(zip(sn.mean(1), sr.mean(1)))))
    if "binding_mem" in res:
        bm, bs = res["binding_mem"], res["binding_soft"]
        print("binding per layer (asked needle's selectivity / the other needles' mean; 1 = the name does not steer):")
        print(f"{'layer':>5} {'mem max':>8} {'mem mean':>9} {'soft max':>9} {'soft mean':>10}")
        for layer in range(bm.shape[0]):
            print(f"{layer:>5} {bm[layer].max():>8.2f} {bm[layer].mean():>9.2f} {bs[layer].max():>9.2f} "
                  f"{bs[layer].mean():>10.2f}")
        print(f"best head binding: memory read {bm.max():.2f}, softmax {bs.max():.2f}" + "".join(
            f", {m} random features {res[f'binding_favor{m}'].max():.2f} (layer "
            f"{np.unravel_index(res[f'binding_favor{m}'].argmax(), bm.shape)[0]})" for m in favor))
        if model.memory_config.write_gate:
            print("write strength β, asked needle / other needles, per layer: " + ", ".join(
                f"{i}: {n:.2f}/{o:.2f}" for i, (n, o) in
                enumerate(zip(res["strength_needle"].mean(1), res["strength_other_needles"].mean(1)))))


if __name__ == "__main__":
    main()
