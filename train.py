"""S-SFT training of EdgeInfinite-Instruct (gate only by default).

    python train.py                                   # default: SmolLM2-135M-Instruct, passkey/needle, ~15 min on CPU
    python train.py configs/experiments/x.yaml key=value ...
    python train.py model_name=qwen2.5-0.5b mesh_name=fsdp run.steps=2000 model.dtype=bfloat16

Config layers: configs/base.yaml -> models/<model_name> -> tasks/<task_name> -> mesh/<mesh_name>
-> experiment file -> key=value overrides (typed; unknown keys fail). See README for Cloud TPU.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nEvery key, its type and default: configs/base.yaml. Run outputs: <run.output_dir>/"
              "{report.md, summary.json, metrics.jsonl, tensorboard/, checkpoints/}.")
        return
    from eijax.cli import enable_compilation_cache, user_errors
    from eijax.train.config_schema import load_config

    experiment = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if experiment else argv
    enable_compilation_cache()  # a resumed or repeated run reuses its compiled steps
    with user_errors():  # config, data and checkpoint mistakes: one "error: ..." line, exit status 2
        config = load_config(experiment, overrides)
        from eijax.train.loop import run

        run(config)


if __name__ == "__main__":  # grain worker processes re-import this module
    main(sys.argv[1:])
