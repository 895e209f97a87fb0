"""Compile every Triton kernel for sm_90 without a GPU and check for register spills.

Runs in a subprocess: the kernels must be imported with TRITON_INTERPRET unset, while
test_kernels_triton sets it for this process. Needs triton's bundled ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import importlib, json, os, subprocess, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

RA = importlib.import_module("zoo.kernels.roi_align")
NM = importlib.import_module("zoo.kernels.nms")
TARGET = GPUTarget("cuda", 90, 32)
CUOBJ = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []


def compile_one(label, fn, types, consts, divisible=(), **opts):
    """As launched: PyTorch's tensors start 16-byte aligned, and Triton specialises pointers on it, and integer
    arguments on being multiples of 16 (`divisible`: those that are)."""
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and (types[a].startswith("*") or a in divisible)}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([CUOBJ, "--dump-resource-usage", f.name], capture_output=True,
                         text=True).stdout
    sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(tok.split(":") for tok in line.split() if ":" in tok)
    results.append({"kernel": label, "regs": int(fields["REG"]),
                    "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
                    "wide_loads": sass.count("LDG.E.128")})


for dt in ("fp32", "bf16"):
    for oh, levels in ((7, 4), (14, 4), (7, 1)):
        types = {"out_ptr": "*" + dt, "gout_ptr": "*" + dt, "rois_ptr": "*fp32", "C": "i32",
                 "sr": "i32"}
        for i in range(5):
            types.update({f"f{i}": "*" + dt, f"g{i}": "*fp32", f"H{i}": "i32",
                          f"W{i}": "i32", f"s{i}": "fp32"})
        for n in ("min_level", "max_level", "canon_size", "canon_level"):
            types[n] = "fp32"
        bc, bb, warps = RA._blocks(256, oh, oh)
        # the forward reads NCHW or channels-last maps into a result of the same layout, or (7x7: the FC box
        # heads' pooler) channels-last maps into an NCHW result; the backward's buffers are always NCHW
        for name, fn, layouts in (("fwd", RA._roi_align_fwd_kernel, ((False, False), (True, True), (True, False))),
                                  ("bwd", RA._roi_align_bwd_kernel, ((False, False),))):
            if levels == 1 and name == "bwd":
                continue
            for cl, out_cl in layouts:
                if cl != out_cl and oh != 7:
                    continue
                consts = dict(OH=oh, OW=oh, PH=oh, PW=oh, STRIDE=1, ALIGNED=True, NUM_LEVELS=levels,
                              BLOCK_C=bc, BLOCK_B=bb, CHANNELS_LAST=cl, OUT_CHANNELS_LAST=out_cl,
                              C_ALIGN=RA._c_align(256, bc) if cl else 1, INTERPRET=False)
                label = ("_nhwc" if cl else "") + ("_to_nchw" if cl != out_cl else "")
                compile_one(f"roi_align_{name}_{dt}_{oh}x{oh}_L{levels}{label}", fn, types,
                            consts, num_warps=warps, enable_fp_fusion=False)
                if name == "fwd" and cl and oh == 7 and levels == 4:  # a channel count not a multiple of 16
                    compile_one(f"roi_align_{name}_{dt}_{oh}x{oh}_L{levels}{label}_odd_C", fn, types,
                                dict(consts, C_ALIGN=1), num_warps=warps, enable_fp_fusion=False)

    # the C4 pooler: every other bin of 14x14 on res4 (C=1024), channels-last maps, as Res5ROIHeads runs it
    bc, bb, warps = RA._blocks(1024, 7, 7)
    consts = dict(OH=14, OW=14, PH=7, PW=7, STRIDE=2, ALIGNED=True, NUM_LEVELS=1, BLOCK_C=bc, BLOCK_B=bb,
                  CHANNELS_LAST=True, OUT_CHANNELS_LAST=True, C_ALIGN=RA._c_align(1024, bc), INTERPRET=False)
    compile_one(f"roi_align_fwd_{dt}_14x14_stride2_L1_nhwc", RA._roi_align_fwd_kernel, types, consts,
                num_warps=warps, enable_fp_fusion=False)

for cdt in ("fp32", "fp64"):
    types = {"boxes_ptr": "*" + cdt, "cls_ptr": "*i64", "thr": "fp32", "thr_ptr": "*" + cdt,
             "mask_ptr": "*i64", "n": "i32", "n_ptr": "*i32", "n_words": "i32"}
    for use_class, live in ((False, False), (True, False), (True, True)):
        if cdt == "fp64" and live:
            continue
        compile_one(f"nms_mask_{cdt}_cls{int(use_class)}_live{int(live)}", NM._nms_mask_kernel, types,
                    dict(USE_CLASS=use_class, THR_FROM_PTR=cdt == "fp64", N_FROM_PTR=live, BLOCK=64),
                    num_warps=NM._mask_warps(torch.float64 if cdt == "fp64" else torch.float32),
                    enable_fp_fusion=False)
types = {k: "*i64" for k in ("mask_ptr", "order_ptr", "removed_ptr", "out_ptr", "count_ptr")}
types.update(n="i32", n_ptr="*i32", n_words="i32", max_out="i32")
for method in NM.SCAN_METHODS:
    for live, stop in ((False, False), (True, False), (True, True)):
        compile_one(f"nms_scan_{method}_live{int(live)}_stop{int(stop)}", NM._nms_scan_kernel, types,
                    dict(N_FROM_PTR=live, STOP_AT_MAX=stop, BLOCK_W=16, FIXPOINT=method == "fixpoint"), num_warps=1)
PA = importlib.import_module("zoo.kernels.paste")
types = {"masks_ptr": "*fp32", "boxes_ptr": "*fp32", "out_ptr": "*u8", "H": "i32", "W": "i32", "thr": "fp32"}
compile_one("paste_masks", PA._paste_kernel, types, dict(M=28, BLOCK_H=PA._BLOCK_H, BLOCK_W=PA._BLOCK_W),
            num_warps=4, enable_fp_fusion=False)
EP = importlib.import_module("zoo.kernels.epilogue")
for dt in ("fp32", "bf16"):
    types = {"y_ptr": "*" + dt, "b_ptr": "*" + dt, "r_ptr": "*" + dt, "rb_ptr": "*" + dt, "R": "i32", "S": "i32",
             "C": "i32", "H": "i32", "W": "i32"}
    # channels-last maps (rows of S = C channels, a multiple of 16), each residual mode (1b: with a shortcut's
    # bias); NCHW with a residual
    for rows_bias, mode, rbias in ((False, 0, False), (False, 1, False), (False, 1, True), (False, 2, False),
                                   (True, 1, False)):
        compile_one(f"epilogue_{dt}_{'nchw' if rows_bias else 'nhwc'}_res{mode}{'b' if rbias else ''}",
                    EP._epilogue_kernel, types,
                    dict(HAS_BIAS=True, BIAS_ON_ROWS=rows_bias, RESIDUAL=mode, RESIDUAL_BIAS=rbias, RELU=True,
                         ROUND=dt != "fp32", BLOCK_R=EP.BLOCK, BLOCK_S=EP.BLOCK), divisible=("S",), num_warps=4,
                    enable_fp_fusion=False)
print("RESULTS " + json.dumps(results))
'''


def test_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert len(results) == 48
    # fp64 NMS (a rare path) may keep a few bytes of stack, and so may the fp32 14x14 pooler on NCHW maps (which the
    # networks never pool from on a GPU: 8 bytes as launched, with 16-byte aligned pointers); nothing else may.
    spilled = [r for r in results if (r["stack"] or r["local"])
               and not (r["kernel"].startswith("nms_mask_fp64") and r["stack"] <= 64)
               and not (r["kernel"] == "roi_align_fwd_fp32_14x14_L4" and r["stack"] <= 8)]
    assert not spilled, spilled
    # channels-last pooling with whole channel blocks reads 16 bytes of channels per load (_c_align), the rest not
    cl_fwd = [r for r in results if r["kernel"].startswith("roi_align_fwd") and "_nhwc" in r["kernel"]]
    assert len(cl_fwd) == 16
    narrow = [r for r in cl_fwd if (r["wide_loads"] > 0) == r["kernel"].endswith("_odd_C")]
    assert not narrow, narrow
    # the epilogue streams whole rows of channels-last maps: 16 bytes per load and store where S is a multiple of 16
    epilogue = [r for r in results if r["kernel"].startswith("epilogue_")]
    assert len(epilogue) == 10
    assert all(r["wide_loads"] > 0 for r in epilogue if "_nhwc" in r["kernel"]), epilogue
