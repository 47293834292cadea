"""Which offload modes run a tiny nf4 / fp8 FLUX.2 transformer on the GPU, per weight source (one process per try)."""
import os, subprocess, sys, tempfile, json

ALL = ["none", "model", "sequential", "group_leaf", "group_leaf_stream", "group_block", "group_block_stream"]
SOME = ["none", "group_leaf", "group_block_stream"]
TRIES = [("nf4", s, m) for s in ("from_pretrained", "build_quantized") for m in ("none", "group_leaf", "group_block_stream")] if os.environ.get("KERNEL_ONLY") else ([("nf4", "from_pretrained", m) for m in ALL] + [("nf4", "build_quantized", m) for m in SOME[:2]]
         + [("fp8", "from_pretrained", m) for m in SOME[1:]] + [("bf16", "materialize", "group_leaf_stream")])

def child(precision, source, mode, tmp):
    import torch
    from flux2bench.axes.precision import tensor_storage
    from flux2bench.sources.quantized import build_quantized
    sys.path.insert(0, "tests")
    from test_quantization import meta_component, from_pretrained
    from flux2bench.sources.random_weights import materialize
    cuda = torch.device("cuda", 0)
    if source == "materialize":
        m = meta_component("transformer"); materialize(m, torch.device("cpu"), seed=4); m.eval()
    elif source == "build_quantized":
        m = build_quantized(meta_component("transformer"), "transformer", precision, torch.device("cpu"), seed=4)
    else:
        path = os.path.join(tmp, "bf16")
        if not os.path.exists(path):
            m = meta_component("transformer"); materialize(m, torch.device("cpu"), seed=4); m.save_pretrained(path)
        m = from_pretrained(path, "transformer", precision).to("cpu")
    seen = {}
    lin = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    def hook(mod, args):
        w = mod.weight
        qs = getattr(w, "quant_state", None)
        seen["weight"] = str(w.device)
        seen["absmax"] = None if qs is None else str(qs.absmax.device)
        seen["inner"] = {k: str(v.device) for k, v in tensor_storage(w).items()}
    lin.register_forward_pre_hook(hook)
    import bitsandbytes as bnb
    real = bnb.matmul_4bit
    def spy(A, B, quant_state=None, **kw):  # the devices the 4-bit kernel is handed, printed before it runs
        if not seen.get("kernel"):
            seen["kernel"] = {"input": str(A.device), "weight": str(B.device), "absmax": str(quant_state.absmax.device),
                              "code": str(quant_state.code.device)}
            print("KERNEL " + json.dumps(seen["kernel"]), flush=True)
        return real(A, B, quant_state=quant_state, **kw)
    bnb.matmul_4bit = spy
    if mode == "none":
        m.to(cuda)
    elif mode == "model":
        from accelerate import cpu_offload_with_hook
        cpu_offload_with_hook(m, cuda)
    elif mode == "sequential":
        from accelerate import cpu_offload
        cpu_offload(m, execution_device=cuda)
    else:
        kind = "leaf_level" if "leaf" in mode else "block_level"
        kw = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        m.enable_group_offload(onload_device=cuda, offload_device=torch.device("cpu"), offload_type=kind,
                               use_stream=mode.endswith("stream"), **kw)
    try:
        out = forward_on(m, cuda)
        torch.cuda.synchronize()
        print(json.dumps({"ok": True, "finite": bool(torch.isfinite(out).all()), **seen}))
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}", **seen}))

def forward_on(m, device):
    import torch
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 96, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 8, 4), guidance=torch.tensor([4.0]))
    inputs = {k: v.to(device, torch.bfloat16 if k.endswith("states") else torch.float32) for k, v in inputs.items()}
    with torch.inference_mode():
        return m(**inputs, return_dict=False)[0]

if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(*sys.argv[1:]); sys.exit(0)
    from concurrent.futures import ThreadPoolExecutor
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    subprocess.run([sys.executable, __file__, "bf16", "from_pretrained", "none", tmp], env=env, capture_output=True)  # saves bf16

    def one(try_):
        p, s, m = try_
        r = subprocess.run([sys.executable, __file__, p, s, m, tmp], capture_output=True, text=True, env=env, timeout=240)
        lines = [l for l in r.stdout.splitlines() if l.startswith(("{", "KERNEL"))]
        lines = [" ".join(lines)] if lines else lines
        res = lines[-1] if lines else "rc=%d %s" % (r.returncode, " | ".join(r.stderr.strip().splitlines()[-3:])[:400])
        return f"{p:5} {s:16} {m:19} {res}"

    with ThreadPoolExecutor(6) as pool:
        for line in pool.map(one, TRIES):
            print(line, flush=True)
