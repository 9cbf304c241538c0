"""The S-SFT run: config -> model, mesh, data, optimizer, checkpoints -> train loop -> report.

`run(config)` is what `python train.py` calls; tests call it directly with small configs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx

from eijax.config import model_config_from_hf
from eijax.train import checkpointing as ckpt
from eijax.train import sharding as shd
from eijax.train.config_schema import Config, ConfigError, config_to_dict
from eijax.train.metrics import MetricsWriter, Progress, gate_stats
from eijax.train.optim import check_lr_scale, count_params, memory_path_only, learning_rate_schedule, make_optimizer, split_trainable
from eijax.train.flops import matmul_peak_flops, model_flops_per_token
from eijax.trained import init_from_trained, memory_patterns, set_params
from eijax.train.step import batch_extent, compile_step, jit_train_step, prepare_batch



def log0(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


# ------------------------------------------------------------------ setup pieces
def maybe_initialize_distributed(config: Config) -> None:
    d = config.distributed
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    jax.distributed.initialize(**kwargs)  # Cloud TPU: everything is found from the environment


def build_model(config: Config):
    """The base model (pretrained, or random from the config's shapes), with the shapes checked."""
    from eijax.pretrained import build_model as build_random, load_pretrained

    m = config.model
    if m.checkpoint:
        model = load_pretrained(m.checkpoint, config.memory, dtype=m.dtype, param_dtype=m.param_dtype)
        c = model.config
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            want = getattr(m, key)
            if want and want != getattr(c, key):
                raise ConfigError(f"model.{key}={want} (model preset {config.model_name!r}) but checkpoint "
                                  f"{m.checkpoint!r} has {key}={getattr(c, key)}")
    else:
        # the family's rules (qkv bias, q/k norm, ...) come from the one place that knows them
        mc = model_config_from_hf(dict(model_type=m.family, vocab_size=m.vocab_size, hidden_size=m.d_model,
                                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                                       num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
                                       intermediate_size=m.d_ff, rope_theta=m.rope_theta,
                                       tie_word_embeddings=m.tie_embeddings),
                                  dtype=m.dtype, param_dtype=m.param_dtype)
        model = build_random(mc, config.memory, seed=config.run.seed)
    if m.init_memory:  # warm start (a resumed run's checkpoint still takes precedence)
        init_from_trained(model, m.init_memory)
    return model


def load_tokenizer_for(config: Config):
    name = config.data.tokenizer or config.model.checkpoint
    if name == "bytes" or not name:
        from eijax.data.byte_tokenizer import ByteTokenizer
        return ByteTokenizer()
    from eijax.tokenizer import load_tokenizer
    return load_tokenizer(name)


def data_config(config: Config, seed_offset: int = 0) -> dict[str, Any]:
    d = config.data
    if d.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={d.batch_size} must divide over {jax.process_count()} processes")
    if d.source == "synthetic":
        from eijax.data.synthetic import check_depth_range
        for r in d.needle_depths:  # checked here, where the error can name the key, not at the first sample
            try:
                check_depth_range(r)
            except ValueError as e:
                raise ConfigError(f"data.needle_depths: {e}") from None
        # the default range passes nothing, so its samples are those of runs made before the option
        ranges = [{} if list(r) == [0.0, 1.0] else {"depth_range": tuple(r)} for r in d.needle_depths]
        sources = [dict(type="synthetic", task=t, num_samples=1_000_000, context_tokens=n, **r)
                   for t in d.tasks for n in d.context_lengths for r in ranges]
    else:
        sources = [dict(type="files", paths=list(d.files))]
    return dict(sources=sources, sink=config.memory.sink, segment=config.memory.window,
                batch_size=d.batch_size // jax.process_count(), buckets=list(d.buckets), max_segments=d.max_segments,
                seed=config.run.seed + seed_offset, shuffle=d.shuffle, num_epochs=None,
                question_position=d.question_position, worker_count=d.num_workers,
                process_index=jax.process_index(), process_count=jax.process_count())


def place(tree, shardings):
    """Host arrays (identical on every process) -> global arrays with the given shardings."""
    def one(x, s):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)


def shard_training_state(trainable_state: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation,
                         mesh, rules) -> tuple[dict, dict, Any, dict[str, Any]]:
    """Place trainable (as float32) and frozen params on the mesh by their logical axes and build the
    optimizer state for the trainable part only. Returns (trainable, frozen, opt_state, shardings)."""
    sh_trainable = nnx.to_pure_dict(shd.state_shardings(trainable_state, mesh, rules))
    sh_frozen = nnx.to_pure_dict(shd.state_shardings(frozen, mesh, rules))
    trainable = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), nnx.to_pure_dict(trainable_state))
    replicated = shd.replicated(mesh)
    sh_opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, trainable), sh_trainable,
                                   transform_non_params=lambda _: replicated)
    shardings = dict(trainable=sh_trainable, opt_state=sh_opt, frozen=sh_frozen,
                     batch=shd.batch_sharding(mesh, rules), replicated=replicated)
    trainable = place(trainable, sh_trainable)
    frozen = place(nnx.to_pure_dict(frozen), sh_frozen)
    opt_state = jax.jit(tx.init, out_shardings=sh_opt)(trainable)
    return trainable, frozen, opt_state, shardings


# ------------------------------------------------------------------ the run
def run(config: Config, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train (and evaluate) as configured. Returns a summary dict (also written to summary.json)."""
    t_start = time.time()
    maybe_initialize_distributed(config)
    out = Path(config.run.output_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "config.json", config_to_dict(config))

    # model, split into trainable (float32) and frozen
    model = build_model(config)
    prior = model.blocks.memory_prior
    if prior is not None and not np.any(np.asarray(prior.z[...])):
        raise ConfigError("memory.prior needs a prior to start from: set model.init_memory to a memory file that "
                          "has one (python -m eijax.memory_prior SOURCE OUT writes it)")
    graphdef, trainable_state, frozen = split_trainable(model, config.optim.trainable)
    check_lr_scale(config.optim, trainable_state)
    n_train, n_all = count_params(trainable_state), count_params(trainable_state) + count_params(frozen)
    log0(f"model {config.model_name}: {n_all / 1e6:.1f}M params, training {n_train:,} "
         f"({100 * n_train / n_all:.3f}%: {config.optim.trainable})")
    weights_fp = ckpt.weights_fingerprint(nnx.to_pure_dict(frozen))

    # mesh, shardings, optimizer state (gate only)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = shd.rules_from_config(config.mesh.logical_axis_rules)
    tx = make_optimizer(config.optim, max(config.run.steps, 1))
    trainable, frozen, opt_state, shardings = shard_training_state(trainable_state, frozen, tx, mesh, rules)
    log0(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")

    # data
    from eijax.data.pipeline import make_iterator
    tokenizer = load_tokenizer_for(config)
    data_iter = make_iterator(data_config(config), tokenizer)

    # checkpoints: resume if there is one
    manager = ckpt.make_manager(out / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save) \
        if config.checkpoint.enabled else None
    meta = dict(base_checkpoint=config.model.checkpoint, arch=ckpt.arch_fingerprint(model),
                weights_fingerprint=weights_fp, trainable_patterns=list(config.optim.trainable),
                memory=dataclasses.asdict(config.memory), model_name=config.model_name)
    if config.model.init_memory:  # what the run did not train stays its init's (eijax.trained reads both)
        meta.update(init_memory=config.model.init_memory, memory_patterns=sorted(
            set(config.optim.trainable) | set(memory_patterns(config.model.init_memory))))
    step = 0
    if manager is not None and config.checkpoint.resume and manager.latest_step() is not None:
        step, trainable, opt_state = ckpt.restore(manager, model, trainable, opt_state, shardings, data_iter, weights_fp)
        log0(f"resumed from {manager.directory}/{step}")

    # evaluation
    evaluator = None
    summary: dict[str, Any] = {"command_config": config.run.name}
    metrics_out = MetricsWriter(out)
    if (config.eval.before or config.eval.after or config.eval.every) and config.eval.tasks and config.eval.lengths:
        from eijax.train.evaluate import Evaluator, eval_samples
        samples = eval_samples(config.eval.tasks, config.eval.lengths, config.eval.examples, config.eval.seed, tokenizer)
        evaluator = Evaluator(model, tokenizer, samples, config.eval.max_new_tokens, config.data.question_position)
        if config.eval.compare and config.eval.after:
            from eijax.trained import trained_base
            trained_base(config.eval.compare)  # a missing compare source fails now, not after training

    def evaluate(tag: str) -> dict[str, float]:
        set_params(model, trainable, config.optim.trainable)
        log0(f"evaluating ({tag}) at step {step}:")
        res, rows = evaluator(log0)
        metrics_out.write(step, res, kind=f"eval_{tag}" if tag in ("before", "after") else "eval")
        if jax.process_index() == 0:
            with open(out / f"eval_{tag}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        return res

    if evaluator is not None and config.eval.before and step == 0:
        summary["eval_before"] = evaluate("before")

    # the step, compiled before the loop
    chunk = config.optim.loss_chunk or config.memory.window
    step_fn = jit_train_step(graphdef, tx, chunk, shardings, memory_path_only(trainable_state),
                             config.optim.distill_weight)
    compiled: dict[tuple, Any] = {}
    schedule = learning_rate_schedule(config.optim, max(config.run.steps, 1))
    flops_tok = model_flops_per_token(model.config, model.memory_config)
    peak_flops = matmul_peak_flops(dtype=config.model.dtype) * jax.device_count()  # measured, all devices
    k = config.optim.grad_accum
    progress = Progress(config.run.steps, initial=step)
    losses: list[float] = []
    tokens_seen, train_seconds = 0, 0.0
    preempted = False
    with ckpt.PreemptionGuard() as guard:
        while step < config.run.steps:
            t0 = time.perf_counter()
            micro, tok = [], 0
            for _ in range(k):
                local = next(data_iter)
                batch = shd.global_batch(prepare_batch(local, config.memory.sink, config.memory.window,
                                                       shd.max_over_processes(batch_extent(local))),
                                         shardings["batch"])
                shape = (batch["tokens"].shape, batch["loss_index"].shape)
                if shape not in compiled:
                    t_c = time.perf_counter()
                    abstract = {key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings["batch"])
                                for key, v in batch.items()}
                    compiled[shape] = compile_step(step_fn, trainable, opt_state, frozen, abstract, progress.write)
                    progress.write(f"  (compiled in {time.perf_counter() - t_c:.1f}s)")
                    t0 += time.perf_counter() - t_c  # compile time is not training throughput
                trainable, opt_state, m = compiled[shape](trainable, opt_state, frozen, batch)
                micro.append(m)
                tok += int(np.sum(local["valid"])) * jax.process_count()
            m = jax.device_get(micro)
            tokens_seen += tok
            loss = float(np.mean([x["loss"] for x in m]))
            dt = time.perf_counter() - t0
            train_seconds += dt
            step += 1
            losses.append(loss)
            n_tok = sum(int(np.sum(np.asarray(x["answer_tokens"]))) for x in m)
            record = dict(loss=loss, learning_rate=float(schedule(step - 1)), grad_norm=float(m[-1]["grad_norm"]),
                          token_accuracy=float(np.mean([x["token_accuracy"] for x in m])), answer_tokens=n_tok,
                          tokens_per_s=tok / dt, model_tflops_per_s=tok * flops_tok / dt / 1e12,
                          mfu=tok * flops_tok / dt / peak_flops,
                          seconds_per_step=dt, **gate_stats(trainable))
            if "distill_kl" in m[0]:
                record["distill_kl"] = float(np.mean([x["distill_kl"] for x in m]))  # reads only the gate leaves
            if step % config.run.log_every == 0 or step == config.run.steps:
                metrics_out.write(step, record)
            progress.update(1, loss, record["tokens_per_s"], record["learning_rate"])
            if on_step is not None:
                on_step(step, record)
            if manager is not None and step % config.checkpoint.every == 0:
                ckpt.save(manager, step, trainable, opt_state, data_iter, meta)
            if evaluator is not None and config.eval.every and step % config.eval.every == 0 and step < config.run.steps:
                evaluate(f"step{step}")
            if guard.requested:
                progress.write(f"SIGTERM: saving step {step} and exiting")
                preempted = True
                break
    progress.close()
    if manager is not None:
        if manager.latest_step() != step:
            ckpt.save(manager, step, trainable, opt_state, data_iter, meta, force=True)
        manager.wait_until_finished()
        manager.close()

    summary.update(steps=step, preempted=preempted, losses=losses, train_seconds=train_seconds,
                   tokens_per_s=tokens_seen / train_seconds if train_seconds else 0.0, trainable_params=n_train,
                   total_params=n_all, flops_per_token=flops_tok, peak_flops=peak_flops,
                   compiled_shapes=[list(k) for k in compiled])
    if evaluator is not None and config.eval.after and not preempted and step >= config.run.steps:
        summary["eval_after"] = evaluate("after")
        if config.eval.compare:
            from eijax.train.evaluate import compare_source
            res = compare_source(config.eval.compare, config.model.checkpoint, config.memory, tokenizer, samples,
                                 config.eval.max_new_tokens, config.data.question_position, log0)
            if res is not None:
                summary["eval_compare"] = res
    summary["wall_seconds"] = time.time() - t_start
    metrics_out.close()
    if jax.process_index() == 0:
        ckpt.write_json(out / "summary.json", summary)
        if config.run.report:
            from eijax.train.report import write_report
            write_report(out / "report.md", config, summary)
    return summary
