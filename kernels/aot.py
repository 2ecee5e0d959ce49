"""Ahead-of-time compile every Triton kernel for given GPU architectures, without a GPU.

`python -m kernels.aot 80 90` compiles each kernel spec (kernel, signature, constexprs) listed by the
kernel modules' `aot_specs()` with ptxas, and prints one JSON line per spec and architecture.
Run it in a process without TRITON_INTERPRET: the interpreter patches triton.language while it runs.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def all_specs() -> list[tuple]:
    """Every (kernel, signature, constexprs) in kernels/."""
    from . import mixed_sum, pool_candidates

    return [spec for module in (mixed_sum, pool_candidates) for spec in module.aot_specs()]


def spec_name(spec: tuple) -> str:
    """A readable id: kernel name, its first data type, and its constexprs."""
    fn, signature, constexprs = spec
    dtype = next(v for v in signature.values() if v.startswith("*") and v != "*i64")
    return f"{fn.__name__}-{dtype}-" + "-".join(f"{k}={v}" for k, v in constexprs.items())


def compile_spec(spec: tuple, capability: int) -> dict:
    """Compiles one spec for sm_<capability>; returns what was produced, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs = spec
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32))
    except Exception as error:  # reported, not raised: the caller sees every failure at once
        return {"name": spec_name(spec), "capability": capability, "ok": False, "error": repr(error)[-2000:]}
    ptx = compiled.asm.get("ptx", "")
    return {"name": spec_name(spec), "capability": capability, "ok": bool(compiled.asm.get("cubin")),
            "ptx_target": next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), ""),
            "cubin_bytes": len(compiled.asm.get("cubin", b""))}


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.aot: unset TRITON_INTERPRET; the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    capabilities = [int(a) for a in argv] or [80, 90]
    failed = 0
    for spec in all_specs():
        for capability in capabilities:
            result = compile_spec(spec, capability)
            failed += not result["ok"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
