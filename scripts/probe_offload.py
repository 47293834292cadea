"""Which offload modes run a quantized tiny FLUX.2 transformer on a CUDA GPU, one isolated process per try.

Each try builds the tiny transformer in one precision (random weights through the libraries' own quantized
loading, ``flux2bench.sources.quantized``, which tests/sources/test_quantization.py proves equal to ``from_pretrained``),
applies one offload mode with the call the offload axis makes, runs one forward pass and prints one JSON line: ok,
whether the output is finite, the devices the first quantized Linear's weight tensors sit on when it runs, and the
error's first line. The known failures are the ``offload_limits`` of flux2bench/axes/quantization_backends.py; run
this after a library upgrade, or for a new backend, to see which still hold.

    python scripts/probe_offload.py --precision int8
    python scripts/probe_offload.py --precision nf4 --precision fp8_row --mode model --mode group_leaf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

MODES = ("none", "model", "sequential", "group_leaf", "group_leaf_stream", "group_block", "group_block_stream")
SEED = 4  # the seed synthetic_pipeline gives the transformer


def tiny_inputs(device: Any) -> dict[str, Any]:
    """One deterministic batch for the tiny transformer (flux2bench/configs/tiny)."""
    import torch

    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 96, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 8, 4), guidance=torch.tensor([4.0]))
    return {k: v.to(device, torch.bfloat16 if k.endswith("states") else torch.float32) for k, v in inputs.items()}


def offload(module: Any, mode: str, device: Any) -> None:
    """Apply ``mode`` to one model as the pipeline-level calls of the offload axis apply it to each component."""
    import torch

    if mode == "none":
        module.to(device)
    elif mode == "model":
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(module, device)
    elif mode == "sequential":
        from accelerate import cpu_offload

        cpu_offload(module, execution_device=device)
    else:
        kind = "leaf_level" if mode.startswith("group_leaf") else "block_level"
        blocks = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type=kind,
                                    use_stream=mode.endswith("_stream"), **blocks)


def probe(precision: str, mode: str, device_name: str) -> dict[str, Any]:
    """One try, in this process: build, offload, run once."""
    import torch

    from flux2bench.axes.precision import tensor_storage
    from flux2bench.models import MODELS
    from flux2bench.sources.quantized import build_quantized
    from flux2bench.sources.random_weights import materialize
    from flux2bench.sources.synthetic import meta_module

    device, cpu = torch.device(device_name), torch.device("cpu")
    module = meta_module(MODELS["tiny"], "transformer")
    if precision == "bf16":
        materialize(module, cpu, seed=SEED)
    else:
        module = build_quantized(module, "transformer", precision, cpu, seed=SEED)
    module.eval()
    seen: dict[str, Any] = {}
    linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))

    def record(layer: Any, args: Any) -> None:
        seen.setdefault("weight_devices", {k: str(v.device) for k, v in tensor_storage(layer.weight).items()})

    linear.register_forward_pre_hook(record)
    try:
        offload(module, mode, device)
        with torch.inference_mode():
            out = module(**tiny_inputs(device), return_dict=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"ok": True, "finite": bool(torch.isfinite(out).all()), **seen}
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        return {"ok": False, "error": f"{type(exc).__name__}: {first}", **seen}


def main() -> int:
    from flux2bench.axes.quantization_backends import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", action="append", choices=PRECISIONS,
                        help="precision to try (repeatable; default: every quantized one)")
    parser.add_argument("--mode", action="append", choices=MODES, help="offload mode to try (repeatable; default: all)")
    parser.add_argument("--device", default="cuda", help="the device the forward runs on (default: cuda)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per try")
    parser.add_argument("--child", nargs=2, metavar=("PRECISION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(probe(*args.child, args.device)), flush=True)
        return 0
    precisions = args.precision or [p for p in PRECISIONS if p != "bf16"]
    for precision in precisions:
        for mode in args.mode or MODES:
            # One process per try: a CUDA illegal memory access poisons the context of the process it happens in.
            command = [sys.executable, __file__, "--child", precision, mode, "--device", args.device]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                result = lines[-1] if lines else json.dumps(
                    {"ok": False, "error": f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])[:400]})
            except subprocess.TimeoutExpired:
                result = json.dumps({"ok": False, "error": f"no answer within {args.timeout:g} s"})
            print(f"{precision:8} {mode:19} {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
