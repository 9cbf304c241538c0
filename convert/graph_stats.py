"""What a quantisation recipe did to a .tflite: stored constant bytes by dtype and consuming op.

    python -m convert.graph_stats exports/qa_static_a16w8.tflite [--scope MemoryGate_gate]

Constants are counted once per buffer (signatures share weights). An op belongs to a scope when
its output tensor's name matches the regex: the same names the recipes' rules match.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path
from typing import Sequence


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    ops = schema.BuiltinOperator
    return {code: name for name, code in vars(ops).items() if not name.startswith("_") and isinstance(code, int)}


def constant_bytes(path: str | Path, scope: str | None = None) -> collections.Counter:
    """{(dtype, op type): bytes} of the constant inputs of every op (or of ops in `scope`)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = tfl.read_model(str(path))
    dtype_name = {code: name for name, code in tfl.TENSOR_TYPE_TO_CODE.items() if isinstance(code, int)}
    op_names = _builtin_names()
    pattern = re.compile(scope) if scope else None
    owner: dict[int, tuple[str, str]] = {}  # buffer -> (dtype, first consuming op type)
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            outputs = [tfl.get_tensor_name(subgraph.tensors[t]) for t in op.outputs if t >= 0]
            if pattern is not None and not any(pattern.search(n) for n in outputs):
                continue
            for t in op.inputs:
                tensor = subgraph.tensors[t] if t >= 0 else None
                if tensor is None or tensor.buffer in owner:
                    continue
                data = model.buffers[tensor.buffer].data
                if data is not None and len(data):
                    code = model.operatorCodes[op.opcodeIndex]
                    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
                    owner[tensor.buffer] = (dtype_name.get(tensor.type, str(tensor.type)), op_names.get(builtin, str(builtin)))
    counts: collections.Counter = collections.Counter()
    for buffer, key in owner.items():
        counts[key] += len(model.buffers[buffer].data)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m convert.graph_stats", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=".tflite file")
    p.add_argument("--scope", help="only ops whose output name matches this regex (e.g. MemoryGate_gate)")
    a = p.parse_args(argv)
    counts = constant_bytes(a.model, a.scope)
    total = sum(counts.values()) or 1
    print(f"{'KiB':>10} {'share':>6}  dtype    op")
    for (dtype, op), n in counts.most_common():
        print(f"{n / 1024:10.1f} {n / total:6.1%}  {dtype:8s} {op}")


if __name__ == "__main__":
    main()
