"""How much of full attention's read from the tokens that left the window could a linear memory give
back, layer by layer, with which kernel: the perplexity side of issue 9's "what design would".

1. `collect`: stream a text through the model as S-SFT and inference do (sink, then windows of
   `window` tokens, each folded into memory after it is read), keeping for every layer the pre-RoPE
   q, k, v of every token, the sink + window attention output `a_L` and the model's own output (memory
   read mixed in by its gate). From these it computes, with absolute positions, what full attention
   would have output over the same q, k, v (`a_full`), its read of the folded tokens alone (`a_E`) and
   their share of its softmax mass (λ), so a_full = λ a_E + (1 - λ) a_L up to the sink's positions.
2. `fit`: per layer, a query map and a key map (per head, started at the identity) for a linear memory
   with kernel φ (σ = elu + 1 as today, or hedgehog: [softmax(x) ; softmax(-x)] over the features),
   written with the plain rule over the folded tokens, mixed by joint normalisation:

       a = (Z_L a_L + c φ(q)ᵀ Σ_E φ(k) vᵀ) / (Z_L + c φ(q)ᵀ Σ_E φ(k))      (c per head, learned)

   i.e. the memory stands in for the folded tokens' share of one softmax, as full attention has it.
   Fitted on one text's layer outputs, scored on another's.

Score: the share of the layer's gap closed, 1 - Σ|a - a_full|² / Σ|a_L - a_full|² over the queries
after the first window (0 = sink + window, 1 = full attention), for the model's own output, the
oracle (λ a_E + (1 - λ) a_L: the most any memory could give here), and each fitted read.

    python -m eijax.eval.read_fit collect --checkpoint smollm2-memory --file eijax/data/assets/persuasion.txt --out DIR_A
    python -m eijax.eval.read_fit collect --checkpoint smollm2-memory --file eijax/data/assets/northanger_abbey.txt --out DIR_B
    python -m eijax.eval.read_fit fit DIR_A DIR_B --layers 2,6,10,14,18,22,26 --kernels sigma,hedgehog
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from eijax import cli
from eijax.eval.key_fit import hedgehog
from eijax.eval.memory_probe import layer_slices
from eijax.layers import adapt, local_attention
from eijax.memory import Memory, read, sigma
from eijax.rope import apply_rope, rope_table

KERNELS = {"sigma": sigma, "hedgehog": hedgehog}


@functools.partial(jax.jit, static_argnums=0)
def _layer(graph, p, i, x, state, valid, cos, sin):
    """One layer of a streamed window: its output x, new cache, and for the window's tokens the pre-RoPE
    q, k, v, the sink + window attention a_L and the model's own attention output (memory mixed in)."""
    blk = nnx.merge(graph, p)
    q, k, v = blk.project_qkv(blk.attn_norm(x))
    x_out, k_cache, v_cache = blk(x, state.k[i], state.v[i], valid, state.fill, Memory(state.memory.M[i], state.memory.z[i]),
                                  state.written, cos, sin, qkv=(q, k, v))
    t, n_slots = x.shape[1], k_cache.shape[1]
    q_pos = state.fill + jnp.arange(t, dtype=jnp.int32)
    mask = valid[:, None, :] & (jnp.arange(n_slots, dtype=jnp.int32)[None, None, :] <= q_pos[None, :, None])
    a_local, lse = local_attention(apply_rope(q, jnp.take(cos, q_pos, axis=0), jnp.take(sin, q_pos, axis=0)),
                                   apply_rope(k_cache, cos[:n_slots], sin[:n_slots]), v_cache, mask, blk.scale,
                                   blk.softcap, with_lse=True)
    own = a_local
    if blk.use_memory:
        memory = Memory(state.memory.M[i], state.memory.z[i])
        q_mem = q if blk.memory_adapter is None else adapt(q, blk.memory_adapter.q[...])
        a_mem, log_mass = read(memory, q_mem, blk.mem_eps, with_log_mass=True)
        g = blk.gate(a_mem, a_local, log_mass - lse)
        own = jnp.where(state.written[:, None, None, None], g * a_mem + (1.0 - g) * a_local, a_local)
    return x_out, k_cache, v_cache, q[0], k[0], v[0], a_local[0], own[0]


def stream_layers(model, tokens: Sequence[int]) -> dict[str, np.ndarray]:
    """Per layer, for every token after the sink: q [NL, T, H, d], k, v [NL, T, Hkv, d] (pre-RoPE),
    a_local and own [NL, T, H, d]; plus the sink's k, v [NL, S, Hkv, d] and each token's window index."""
    mem = model.memory_config
    s, w = mem.sink, mem.window
    graph, layer_params, cos, sin = layer_slices(model)
    n_layers = model.config.n_layers

    def run(state, ids):
        x = model.embed_tokens(jnp.asarray([ids]))
        valid = jax.lax.dynamic_update_slice(state.valid, jnp.ones((1, len(ids)), bool), (0, int(state.fill)))
        ks, vs, rec = [], [], []
        for i in range(n_layers):
            x, k_c, v_c, *r = _layer(graph, layer_params[i], i, x, state, valid, cos, sin)
            ks.append(k_c)
            vs.append(v_c)
            rec.append([np.asarray(a, np.float32) for a in r])
        return rec, state._replace(k=jnp.stack(ks), v=jnp.stack(vs), valid=valid, fill=state.fill + len(ids))

    state = model.init_state(1)
    rec, state = run(state, list(tokens[:s]))
    sink_k, sink_v = np.stack([r[1] for r in rec]), np.stack([r[2] for r in rec])
    parts, window = [], []
    for j, at in enumerate(tqdm(range(s, len(tokens), w), desc="stream", unit="window")):
        seg = list(tokens[at:at + w])
        rec, state = run(state._replace(fill=jnp.asarray(s, jnp.int32)), seg)
        parts.append(rec)
        window += [j] * len(seg)
        state = model.compress(state)
    out = {name: np.concatenate([np.stack([r[n] for r in rec]) for rec in parts], axis=1)
           for n, name in enumerate(("q", "k", "v", "a_local", "own"))}
    return {**out, "sink_k": sink_k, "sink_v": sink_v, "window": np.asarray(window)}


def full_attention_split(q, k, v, sink_k, sink_v, window, rope, scale: float) -> dict[str, np.ndarray]:
    """One layer, absolute positions (sink 0..S-1, then the stream): full attention's output a_full,
    its read of the folded tokens (earlier windows) a_E, their mass share λ and the log mass of the
    unfolded ones (sink + own window up to the query) lse_L. q [T, H, d]; k, v [T, Hkv, d]."""
    n_sink, t = sink_k.shape[0], q.shape[0]
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    cos, sin = rope_table(rope, d, n_sink + t)
    keys = apply_rope(jnp.concatenate([sink_k, k]), cos, sin)
    vals = jnp.concatenate([sink_v, v])
    qr = apply_rope(jnp.asarray(q), cos[n_sink:], sin[n_sink:]).reshape(t, hkv, h // hkv, d)
    kpos = np.arange(n_sink + t)
    kwin = np.concatenate([np.full(n_sink, -1), window])
    causal = kpos[None, :] <= (n_sink + np.arange(t))[:, None]
    folded = jnp.asarray(causal & (kwin[None, :] >= 0) & (kwin[None, :] < window[:, None]))
    unfolded = jnp.asarray(causal) & ~folded
    logits = jnp.einsum("tkgd,ckd->kgtc", qr, keys) * scale
    floor = jnp.finfo(jnp.float32).min

    def part(m):
        lg = jnp.where(m[None, None], logits, floor)
        lse = jax.nn.logsumexp(lg, axis=-1)
        a = jnp.einsum("kgtc,ckd->tkgd", jnp.exp(lg - lse[..., None]), vals).reshape(t, h, d)
        return a, jnp.moveaxis(lse, -1, 0).reshape(t, h)

    a_full, _ = part(jnp.asarray(causal))
    a_e, lse_e = part(folded)
    _, lse_l = part(unfolded)
    has_e = np.asarray(folded.any(-1))
    lam = jnp.where(has_e[:, None], jax.nn.sigmoid(lse_e - lse_l), 0.0)
    return {name: np.asarray(x, np.float32) for name, x in
            (("a_full", a_full), ("a_e", a_e), ("lam", lam), ("lse_l", lse_l))}


def collect(model, tokens: Sequence[int], folder: Path) -> None:
    """Write layer_<i>.npz (what `fit` needs for layer i) for every layer."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = stream_layers(model, tokens)
    scale = 1.0 / math.sqrt(model.config.head_dim) if model.blocks.scale is None else float(model.blocks.scale)
    for i in tqdm(range(model.config.n_layers), desc="full attention", unit="layer"):
        split = full_attention_split(rec["q"][i], rec["k"][i], rec["v"][i], rec["sink_k"][i], rec["sink_v"][i],
                                     rec["window"], model.config.rope, scale)
        arrays = {**{n: rec[n][i].astype(np.float16) for n in ("q", "k", "v", "a_local", "own")},
                  **{n: x.astype(np.float16 if n.startswith("a_") else np.float32) for n, x in split.items()},
                  "window": rec["window"]}
        tmp = folder / f"layer_{i:02d}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(folder / f"layer_{i:02d}.npz")


def _load(folder: Path, layer: int) -> dict[str, jax.Array]:
    path = folder / f"layer_{layer:02d}.npz"
    if not path.exists():
        raise cli.MissingInput(f"{path} not found (run `collect` first; layers are numbered from 0)")
    return {n: jnp.asarray(x.astype(np.float32) if x.dtype == np.float16 else x) for n, x in np.load(path).items()}


def layout(data) -> tuple[int, int]:
    """(windows, tokens per window) of a collected layer: every window is full but the last."""
    window = np.asarray(data["window"])
    return int(window.max()) + 1, int((window == 0).sum())


def linear_read(params, data, kernel: str, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """The memory's read r [T, H, d] and log of its mass φ(q)ᵀ Σ_E φ(k) [T, H] for every query, the
    memory holding every earlier window (plain rule, β = 1), maps per head. shape: `layout(data)`."""
    phi = KERNELS[kernel]
    q, k, v = data["q"], data["k"], data["v"]
    t, h, d = q.shape
    hkv = k.shape[1]
    n_windows, size = shape

    def by_window(x):  # [T, ...] -> [W, size, ...], zero-padded
        x = jnp.pad(x, [(0, n_windows * size - t)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n_windows, size, *x.shape[1:])

    fq = by_window(phi(jnp.einsum("thd,hde->the", q, params["wq"])))     # [W, S, H, F]
    fk = by_window(phi(jnp.einsum("tkd,kde->tke", k, params["wk"])))     # [W, S, Hkv, F]
    fk = fk * by_window(jnp.ones(t))[..., None, None]                                   # padding writes nothing
    per_win_m = jnp.einsum("wskf,wskd->wkfd", fk, by_window(v))
    per_win_z = fk.sum(1)
    m = jnp.cumsum(per_win_m, 0) - per_win_m                                            # earlier windows only
    z = jnp.cumsum(per_win_z, 0) - per_win_z
    fqg = fq.reshape(n_windows, size, hkv, h // hkv, -1)
    num = jnp.einsum("wskgf,wkfd->wskgd", fqg, m).reshape(n_windows * size, h, d)[:t]
    den = jnp.einsum("wskgf,wkf->wskg", fqg, z).reshape(n_windows * size, h)[:t] + 1e-6
    return num / den[..., None], jnp.log(den)


def mixed(params, data, kernel: str, shape: tuple[int, int]) -> jax.Array:
    """Joint normalisation of the memory read with sink + window attention (module docstring)."""
    r, log_den = linear_read(params, data, kernel, shape)
    lam = jax.nn.sigmoid(params["log_c"] + log_den - data["lse_l"])
    lam = jnp.where((data["window"] > 0)[:, None], lam, 0.0)
    return lam[..., None] * r + (1.0 - lam[..., None]) * data["a_local"]


def gap_closed(out: jax.Array, data) -> float:
    """1 - Σ|out - a_full|² / Σ|a_L - a_full|² over the queries after the first window."""
    after = (data["window"] > 0)[:, None, None]
    err = jnp.sum(jnp.where(after, out - data["a_full"], 0.0) ** 2)
    floor = jnp.sum(jnp.where(after, data["a_local"] - data["a_full"], 0.0) ** 2)
    return float(1.0 - err / floor)


def fit_layer(data, kernel: str, steps: int, lr: float) -> dict[str, jax.Array]:
    """Maps (identity start) and the mixing constant that minimise the layer's output error."""
    h, d = data["q"].shape[1:]
    hkv = data["k"].shape[1]
    shape = layout(data)
    eye = jnp.eye(d)
    lam = data["lam"][data["window"] > 0]
    # no biases: the maps are the model's memory adapter (per head, d x d), c its joint gate's
    params = {"wq": jnp.tile(eye, (h, 1, 1)), "wk": jnp.tile(eye, (hkv, 1, 1)), "log_c": jnp.zeros(h)}
    # start c where the mixing weight's mean matches λ's (else the first steps only move c)
    _, log_den = linear_read(params, data, kernel, shape)
    after = data["window"] > 0
    params["log_c"] = (jnp.log(lam.mean(0) / (1 - lam.mean(0))) - (log_den - data["lse_l"])[after].mean(0))
    opt = _adam(lr)
    state = opt.init(params)
    for _ in range(steps):
        params, state = _fit_step(params, state, data, kernel, shape, opt)
    return params


_adam = functools.lru_cache(optax.adam)  # one optimizer object per lr, so the jitted step is reused


def _output_loss(params, data, kernel: str, shape: tuple[int, int]) -> jax.Array:
    after = (data["window"] > 0)[:, None, None]
    err = (mixed(params, data, kernel, shape) - data["a_full"]) ** 2
    return jnp.sum(jnp.where(after, err, 0.0)) / after.sum()


@functools.partial(jax.jit, static_argnums=(3, 4, 5))  # compiled once per kernel and shape, for every layer
def _fit_step(params, state, data, kernel: str, shape: tuple[int, int], opt):
    g = jax.grad(_output_loss)(params, data, kernel, shape)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state


def fit(train_dir: Path, test_dir: Path, layers: Sequence[int], kernels: Sequence[str], steps: int,
        lr: float, save: Path | None = None) -> list[dict]:
    """Per layer: the share of the gap closed on the held-out text by the model's own output, the
    oracle, and each kernel before (identity maps) and after fitting on the training text."""
    rows, fitted = [], {}
    for layer in tqdm(list(layers), desc="fit", unit="layer"):
        tr, te = _load(train_dir, layer), _load(test_dir, layer)
        oracle = te["lam"][..., None] * te["a_e"] + (1 - te["lam"][..., None]) * te["a_local"]
        row = {"layer": layer, "own": gap_closed(te["own"], te), "oracle": gap_closed(oracle, te),
               "lambda": float(te["lam"][te["window"] > 0].mean())}
        for kernel in kernels:
            p = fit_layer(tr, kernel, steps, lr)
            fitted.setdefault(kernel, []).append({n: np.asarray(x) for n, x in p.items()})
            row[kernel] = gap_closed(mixed(p, te, kernel, layout(te)), te)
            row[f"{kernel}_train"] = gap_closed(mixed(p, tr, kernel, layout(tr)), tr)
        rows.append(row)
        if save is not None:  # after every layer, so an interrupted fit keeps what it has
            np.savez(save, layers=np.asarray(rows and [r["layer"] for r in rows]),
                     **{f"{k}_{n}": np.stack([p[n] for p in ps]) for k, ps in fitted.items() for n in ps[0]})
    return rows


def markdown(rows: list[dict], kernels: Sequence[str]) -> str:
    lines = ["| layer | mean λ | model's own (shipped read + gate) | oracle | "
             + " | ".join(f"fitted {k} (train text)" for k in kernels) + " |",
             "|---|---|---|---|" + "---|" * len(kernels)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['lambda']:.2f} | {r['own']:.2f} | {r['oracle']:.2f} | "
                     + " | ".join(f"{r[k]:.2f} ({r[k + '_train']:.2f})" for k in kernels) + " |")
    return "\n".join(lines)


def set_fitted(model, fitted: dict[str, np.ndarray]) -> None:
    """Put a `fit --save` file's maps and constants into a model built with gate "joint", the
    adapter, the linear rule and no write gate (every layer must have been fitted)."""
    n_layers, mem = model.config.n_layers, model.memory_config
    if list(fitted["layers"]) != list(range(n_layers)):
        raise cli.InputError(f"the fit covers layers {list(fitted['layers'])}: export needs all {n_layers}")
    if "sigma_wq" not in fitted:
        raise cli.InputError("the fit has no sigma maps (fit with --kernels sigma): the model's memory reads with σ")
    if mem.gate != "joint" or not mem.adapter or mem.rule != "linear" or mem.write_gate or mem.prior:
        raise cli.InputError("export needs a model with gate joint + adapter, rule linear, no write gate or prior")
    blocks = model.blocks
    blocks.memory_adapter.q.value = jnp.asarray(fitted["sigma_wq"], blocks.memory_adapter.q.value.dtype)
    blocks.memory_adapter.k.value = jnp.asarray(fitted["sigma_wk"], blocks.memory_adapter.k.value.dtype)
    blocks.gate.bias.value = jnp.asarray(fitted["sigma_log_c"], blocks.gate.bias.value.dtype)


@cli.main_guard
def main(argv: Sequence[str] | None = None) -> list[dict] | None:
    from eijax.generate import add_model_args, load_for_cli

    p = cli.ArgumentParser(prog="python -m eijax.eval.read_fit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="stream a text and keep each layer's q, k, v and attention outputs")
    add_model_args(c, geometry=(32, 256))
    c.add_argument("--file", required=True, help="a long UTF-8 text")
    c.add_argument("--tokens", type=int, default=2048, help="its first N tokens")
    c.add_argument("--out", required=True, help="folder for layer_<i>.npz")
    f = sub.add_parser("fit", help="fit a memory read per layer on one collected text, score it on another")
    f.add_argument("train_dir")
    f.add_argument("test_dir")
    f.add_argument("--layers", default="", help="comma list (default: every collected layer)")
    f.add_argument("--kernels", default="sigma,hedgehog", help=f"comma list of {', '.join(KERNELS)}")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--save", help="also write the fitted maps and constants (<kernel>_wq [layers, H, d, d], "
                                  "<kernel>_wk, <kernel>_log_c) to this .npz")
    e = sub.add_parser("export", help="write a `fit --save` file's sigma maps as a memory-path checkpoint "
                                      "(gate joint, adapter, linear rule) that --checkpoint accepts")
    e.add_argument("fitted", help="the .npz of `fit --save`")
    e.add_argument("out", help="output stem: writes <out>.safetensors and <out>.json")
    e.add_argument("--model", default="smollm2", help="the base the fit was collected on")
    e.add_argument("--sink", type=int, default=32)
    e.add_argument("--window", type=int, default=256)
    a = p.parse_args(argv)
    if a.command == "export":
        from eijax.config import MemoryConfig
        from eijax.generate import load_model
        from eijax.trained import save_memory_file

        fitted = dict(np.load(cli.existing_file(a.fitted, "fitted")))
        model = load_model(a.model, MemoryConfig(sink=a.sink, window=a.window, rule="linear", gate="joint",
                                                 adapter=True), None)
        set_fitted(model, fitted)
        stem = save_memory_file(model, ["gate", "memory_adapter"], a.out, a.model,
                                {"note": f"read_fit export of {a.fitted}: layer-by-layer fit, no training"})
        print(f"wrote {stem}.safetensors and {stem}.json")
        return None
    if a.command == "collect":
        path = cli.existing_file(a.file, "--file")
        model, tok = load_for_cli(a)
        tokens = list(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False))[:a.tokens]
        if len(tokens) < model.memory_config.cache_size + 2:
            raise cli.InputError(f"--tokens {a.tokens}: need more than one sink + window "
                                 f"({model.memory_config.cache_size}) to have folded tokens")
        collect(model, tokens, Path(a.out))
        return None
    kernels = [k for k in a.kernels.split(",") if k]
    if unknown := [k for k in kernels if k not in KERNELS]:
        raise cli.InputError(f"--kernels: unknown {', '.join(unknown)} (choose from {', '.join(KERNELS)})")
    folder = Path(a.train_dir)
    n_layers = len(list(folder.glob("layer_*.npz")))
    layers = [int(x) for x in a.layers.split(",") if x] or list(range(n_layers))
    rows = fit(folder, Path(a.test_dir), layers, kernels, a.steps, a.lr, Path(a.save) if a.save else None)
    print(markdown(rows, kernels))
    return rows


if __name__ == "__main__":
    main()
