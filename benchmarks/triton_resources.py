"""The resource and bytes report of the package's Triton kernels, without a GPU.

    python benchmarks/triton_resources.py                  # rewrite results/triton_resources.md
    python benchmarks/triton_resources.py --json rows.json  # the raw rows, no report
    python benchmarks/triton_resources.py --cover --json r  # the CI subset (python_tests/test_triton_compile.py)

Compiles every kernel for sm_90 (H100/H200) and sm_80 (A100) at the launch configurations
the launchers pick for docs/design.md §6 shapes (``triton_aot.py`` records them from the
launchers themselves) and reads back registers, spill stack, local and shared memory.
Next to that, a bytes-moved model of each kernel at the same shapes against its floor.
Exit status 1 if any compile fails a check (``triton_aot.check``).
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_aot import (  # noqa: E402  (drops TRITON_INTERPRET before triton is imported)
    DTYPES, MODELS, SPAN_MARGIN, TARGETS, TOKENS, attention_shapes, check, compile_all, le_chunked, le_decode,
    le_matmul, le_one_pass, torch, triton, vda,
)
from vreason_kernels.ops.linear_entropy.triton_backend import vocab_split_plan  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "triton_resources.md"


def attention_plan(b, hkv, g, t, n, d, sm_count, dtype):
    """The launchers' choices: (forward blocks, forward chunk and splits, backward blocks,
    backward chunk, fuse_dq)."""
    blocks = vda._blocks(g * t, d, dtype)
    row_tiles = triton.cdiv(g * t, blocks["BLOCK_M"])
    chunk = vda._chunk(b * hkv * row_tiles, n, blocks["BLOCK_N"], sm_count)
    bwd_blocks = vda._blocks(g * t, d, dtype, backward=True)
    fuse_dq = g * t <= bwd_blocks["BLOCK_M"]
    bwd_chunk = vda._chunk(b * hkv, n, bwd_blocks["BLOCK_N"], sm_count) if fuse_dq else bwd_blocks["BLOCK_N"]
    return blocks, chunk, triton.cdiv(n, chunk), bwd_blocks, bwd_chunk, fuse_dq


# ----------------------------------------------------------------------------------------
# Bytes-moved model (docs/design.md §9.2): HBM bytes per launch from its grid and tiles
# ----------------------------------------------------------------------------------------

L2_BYTES = {"sm_90": 50 * 2**20, "sm_80": 40 * 2**20}
# H100's L2 is two partitions; a line read by SMs on both sides can be held twice, so a
# working set is taken to stay L2-resident only if it fits half of it.
L2_USABLE = 0.5


@dataclasses.dataclass
class Traffic:
    kernel: str
    shape: str
    floor: float  # bytes every implementation must move
    hbm: float  # bytes this design moves to/from HBM
    l2: float  # bytes its programs request (HBM + re-reads meant to hit L2)
    working_set: float  # bytes that must stay in L2 for the re-reads to hit
    note: str
    flops: float = 0.0  # the least arithmetic any implementation does
    work: float = None  # the arithmetic this design does (default: flops)
    # (HBM bytes, bf16-equivalent flops) per launch, for designs of several launches that
    # cannot overlap one another's memory and arithmetic: the model sums their bounds.
    launches: tuple = ()

    def ratio(self) -> float:
        return self.hbm / self.floor

    def floor_us(self, target: str) -> float:
        """max(bytes / bandwidth, flops / dense bf16 peak)."""
        _, _, _, gbps, tflops = TARGETS[target]
        return max(self.floor / (gbps * 1e3), self.flops / (tflops * 1e6))

    def model_us(self, target: str) -> float:
        """The same bound with this design's bytes and arithmetic (a lower bound on its time)."""
        _, _, _, gbps, tflops = TARGETS[target]
        if self.launches:
            return sum(max(b / (gbps * 1e3), f / (tflops * 1e6)) for b, f in self.launches)
        work = self.flops if self.work is None else self.work
        return max(self.hbm / (gbps * 1e3), work / (tflops * 1e6))


def one_pass_traffic(target: str, dtype=torch.bfloat16):
    """The one-pass forward (partials + merge) with the gradient at T > 1: no longer what
    ``forward`` runs there, but what the vocabulary-parallel op runs on each slice."""
    sm_count = TARGETS[target][1]
    e = torch.finfo(dtype).bits // 8
    l2 = L2_BYTES[target] * L2_USABLE
    for model, spec in MODELS.items():
        D, V = spec["D"], spec["V"]
        for rows in TOKENS[1:]:
            blocks = le_one_pass.forward_blocks(rows, dtype)
            chunk, splits = vocab_split_plan(rows, V, blocks["BLOCK_R"], blocks["BLOCK_V"], sm_count)
            row_blocks = triton.cdiv(rows, blocks["BLOCK_R"])
            resident = min(row_blocks * splits, 2 * sm_count)
            rows_per_block = min(rows, blocks["BLOCK_R"])  # masked rows move no bytes
            w = V * D * e
            tiles = triton.cdiv(V, blocks["BLOCK_V"])
            # A and B (fp32) read and written once per vocabulary tile, per row.
            slab = rows * D * 4 * 2 * 2 * tiles
            slab_set = resident * rows_per_block * D * 4 * 2
            # Programs in flight on different splits each hold their current W tile for its re-read.
            w_set = min(resident, splits) * blocks["BLOCK_V"] * D * e
            fits = slab_set + w_set <= l2
            io = rows * D * e + rows * V * e + rows * D * 4  # hidden, logits, dH/dh
            merge = splits * rows * D * 4 * 2 + rows * D * 4
            # Row blocks of one split run side by side (grid axis 0 is fastest), so they share W in L2.
            hbm = w + (0 if fits else slab) + io + merge
            yield Traffic(
                "linear_entropy one-pass fwd+dh (vocab-parallel slices)", f"{model} T={rows}", w + io, hbm,
                l2=row_blocks * 2 * w + slab + io + merge, working_set=slab_set + w_set,
                note=f"grid {row_blocks}x{splits}, A/B slab {slab / w:.2f} B per W byte, "
                     + ("fits L2" if fits else "slab and W tiles spill out of L2"),
                flops=4 * rows * V * D,  # logits and dH/dh: two GEMMs
                work=6 * rows * V * D,  # logits, A and B: three
            )


def linear_entropy_decode_traffic(target: str, dtype=torch.bfloat16):
    """The T=1 kernel with A/B on chip: W streamed once, one (A, B) partial per split."""
    sm_count = TARGETS[target][1]
    e = torch.finfo(dtype).bits // 8
    for model, spec in MODELS.items():
        D, V = spec["D"], spec["V"]
        splits = 2 * sm_count
        w = V * D * e
        io = D * e + V * e + D * 4
        partials = 2 * splits * D * 4 * 2  # written once, read once by the merge
        yield Traffic("linear_entropy decode fwd+dh", f"{model} T=1", w + io, w + io + partials, w + io + partials,
                      working_set=0, note=f"{splits} programs, partials {partials / w:.3f} B per W byte",
                      flops=4 * V * D)


def attention_traffic(target: str, dtype=torch.bfloat16):
    """value_delta_attention forward + backward (decode: V-Reason's update; prefill: once per video)."""
    sm_count = TARGETS[target][1]
    e = torch.finfo(dtype).bits // 8
    for label, b, hkv, g, t, n, d in attention_shapes():
        if d != 128:
            continue
        s = n - SPAN_MARGIN
        blocks, chunk, splits, bwd_blocks, bwd_chunk, fuse_dq = attention_plan(b, hkv, g, t, n, d, sm_count, dtype)
        kv = b * hkv * n * d * e
        delta = b * hkv * s * d * e
        rows_io = b * hkv * g * t * d * e
        grad_delta = b * hkv * s * d * 4  # fp32
        # Floor: K, V, delta read once per pass (forward, and the backward's recompute), q/o/dO, d delta.
        floor = 2 * (2 * kv + delta) + 4 * rows_io + grad_delta
        if fuse_dq:  # decode: every program reads its chunk of K/V/delta once per pass
            fwd_slab = 2 * splits * b * hkv * g * t * d * 4 if splits > 1 else 0
            dq_parts = 2 * triton.cdiv(n, bwd_chunk) * b * hkv * g * t * d * 4
            hbm = floor + fwd_slab + dq_parts
            l2, ws, note = hbm, 0, f"{splits} splits fwd, {triton.cdiv(n, bwd_chunk)} chunks bwd"
        else:  # prefill: row tiles re-read K/V (causal: half on average), meant to hit L2
            row_tiles = triton.cdiv(g * t, blocks["BLOCK_M"])
            bwd_row_tiles = triton.cdiv(g * t, bwd_blocks["BLOCK_M"])
            rereads = (row_tiles + 2 * bwd_row_tiles) * (2 * kv + delta) / 2
            hbm = floor
            l2 = floor + rereads  # forward, dV pass over row tiles, dQ pass
            ws = b * hkv * (2 * n * d * e + s * d * e)
            note = f"{row_tiles} row tiles per kv-head (backward {bwd_row_tiles})"
        # Causal forward 2 Hq T N D (QK^T and PV, halved by the mask), backward 2.5x that (FA2's count).
        flops = 3.5 * 2 * b * hkv * g * t * n * d if t > 1 else 0.0
        yield Traffic("value_delta_attention fwd+bwd", label, floor, hbm, l2, ws, note, flops)


def _chunk_sizes(rows: int, vocab: int) -> list:
    size = le_chunked.chunk_rows(rows, vocab)
    return [min(size, rows - start) for start in range(0, rows, size)]


def _gemm_launch(m, n, k, a_bytes, b_bytes, out_bytes, tf32, target, split_k=False):
    """(HBM bytes, bf16-equivalent flops) of one ``triton_matmul.matmul``.

    The grouped order keeps the programs in flight on the same A rows and B columns, so
    B is read once, and so is A where it fits L2. An A too big for L2 (G in ``G W``, K =
    the vocabulary) is streamed once per wave of programs; split-K waves each read their
    own K range. One 8-warp block per SM (ptxas gives the 128 x 128 tiles 150-250
    registers per thread). tl.dot at tf32 runs at half the bf16 rate: its flops count twice.
    """
    sm_count = TARGETS[target][1]
    blocks = le_matmul.matmul_blocks(m, tf32)
    tiles = triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"])
    splits = le_matmul.split_k_plan(tiles, k, blocks["BLOCK_K"], sm_count)[1] if split_k else 1
    # A group's A rows serve all its N tiles: read once if they stay in L2 meanwhile.
    group_m = min(blocks["GROUP_M"], triton.cdiv(m, blocks["BLOCK_M"]))
    group_a = a_bytes * group_m * blocks["BLOCK_M"] / m
    waves = triton.cdiv(group_m * triton.cdiv(n, blocks["BLOCK_N"]), sm_count)
    a_reads = 1 if splits > 1 or group_a <= L2_BYTES[target] * L2_USABLE else waves
    partials = 2 * splits * m * n * 4 if splits > 1 else 0
    return a_reads * a_bytes + b_bytes + out_bytes + partials, 2 * m * n * k * (2 if tf32 else 1)


def chunked_traffic(target: str, dtype=torch.bfloat16):
    """``forward`` with the gradient and the logits at T > 1 (and T=1 behind the switch):
    per chunk of C rows, the logits GEMM, their copy out, stats, G, and ``dH/dh = G W``."""
    e = torch.finfo(dtype).bits // 8
    for model, spec in MODELS.items():
        D, V = spec["D"], spec["V"]
        w = V * D * e
        for rows in TOKENS:
            sizes = _chunk_sizes(rows, V)
            launches = []
            for c in sizes:
                x = c * V * 4  # the fp32 scratch
                launches += [
                    _gemm_launch(c, V, D, c * D * e, w, x, False, target),  # logits = h W^T
                    (x + c * V * e, 0.0),  # the logits returned
                    (x, 0.0),  # stats (the merge moves a few KB)
                    (2 * x, 0.0),  # G over the logits
                    _gemm_launch(c, D, V, x, w, c * D * 4, True, target, split_k=True),  # dH/dh = G W
                ]
            io = rows * D * e + rows * V * e + rows * D * 4  # hidden, logits, dH/dh
            moved = sum(b for b, _ in launches)
            yield Traffic("linear_entropy fwd+dh (statistics first)", f"{model} T={rows}", w + io,
                          moved, l2=moved, working_set=0,
                          note=("only with VREASON_LINEAR_ENTROPY_DECODE_KERNEL=0: " if rows == 1 else "")
                               + f"{len(sizes)} chunk(s) of {sizes[0]} rows, W read {2 * len(sizes)}x, "
                               f"scratch {5 * rows * V * 4 / w:.2f} B per W byte, G W at tf32",
                          flops=4 * rows * V * D, launches=tuple(launches))


def weight_grad_traffic(target: str, dtype=torch.bfloat16):
    """dW per chunk of C rows: the logits GEMM, G over them (from the forward's statistics),
    ``dW += G^T h`` (dW read and written again by every chunk after the first)."""
    e = torch.finfo(dtype).bits // 8
    for model, spec in MODELS.items():
        D, V = spec["D"], spec["V"]
        w = V * D * e
        dw = V * D * 4
        for rows in TOKENS:
            sizes = _chunk_sizes(rows, V)
            launches = []
            for i, c in enumerate(sizes):
                x = c * V * 4
                launches += [
                    _gemm_launch(c, V, D, c * D * e, w, x, False, target),
                    (2 * x, 0.0),  # G over the logits
                    _gemm_launch(V, D, c, x, c * D * e, dw * (2 if i else 1), True, target),
                ]
            moved = sum(b for b, _ in launches)
            yield Traffic("linear_entropy dW (statistics first)", f"{model} T={rows}", w + rows * D * e + dw,
                          moved, l2=moved, working_set=0,
                          note=f"{len(sizes)} chunk(s), logits computed once, dW accumulated {len(sizes)}x, "
                               "G^T h at tf32",
                          flops=4 * rows * V * D, launches=tuple(launches))


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def _resource_table(rows) -> list:
    lines = ["| target | kernel | warps | stages | config | REG | STACK | LOCAL | SHARED (B) | decode | shapes "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ("target", "module", "kernel", "config", "num_warps", "num_stages")
    for r in sorted(rows, key=lambda r: tuple(r[k] for k in order)):
        problems = check(r)
        shapes = sorted({" ".join(label.split()[:2]) for label in r["shapes"]})
        dtypes = sorted({word for label in r["shapes"] for word in label.split() if word in DTYPES})
        cells = ("-",) * 4 if "error" in r else (r["REG"], r["STACK"], r["LOCAL"], r["SHARED"])
        lines.append(f"| {r['target']} | {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['config']} | "
                     + " | ".join(map(str, cells))
                     + f" | {'yes' if r['decode'] else ''} | {', '.join(shapes)} ({'/'.join(dtypes)}) | "
                     + ("; ".join(problems) if problems else "ok") + " |")
    return lines


def _spill_summary(rows) -> list:
    """Off the decode path a spill is allowed (the test does not fail on it) but costs time:
    list where they are, per target, kernel and precision, so tuning on a GPU can start there."""
    spills = {}
    for r in rows:
        if "error" not in r and (r["STACK"] or r["LOCAL"]):
            precision = next((p for p in ("ieee", "tf32") if f"PRECISION={p}" in r["config"]), "-")
            spills.setdefault((r["target"], r["kernel"], precision), []).append(r)
    lines = ["Spills off the decode path (compiles with a non-zero STACK or LOCAL; none is on the decode",
             "path, which the test enforces), by precision (ieee: fp32 inputs; tf32: bf16/fp16):", ""]
    for (target, kernel, precision), found in sorted(spills.items()):
        worst = max(found, key=lambda r: r["STACK"] + r["LOCAL"])
        lines.append(f"- {target} `{kernel}` ({precision}): {len(found)} compiles, worst STACK {worst['STACK']} B at "
                     f"[{worst['config']}, warps={worst['num_warps']}, stages={worst['num_stages']}]")
    return lines + [""] if spills else []


SOURCES = (linear_entropy_decode_traffic, chunked_traffic, weight_grad_traffic, one_pass_traffic, attention_traffic)


def _traffic_table(target: str) -> list:
    lines = ["| kernel | shape | floor (MB) | model HBM (MB) | HBM / floor | L2 requests (MB) | L2 working set (MB) "
             "| floor (us) | model (us) | model / floor | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for source in SOURCES:
        for x in source(target):
            floor_us, model_us = x.floor_us(target), x.model_us(target)
            lines.append(f"| {x.kernel} | {x.shape} | {x.floor / 1e6:.1f} | {x.hbm / 1e6:.1f} | {x.ratio():.2f} | "
                         f"{x.l2 / 1e6:.1f} | {x.working_set / 2**20:.1f} | {floor_us:.0f} | {model_us:.0f} | "
                         f"{model_us / floor_us:.2f} | {x.note} |")
    return lines


def _misses(target: str) -> list:
    """The launches whose model bound is over 1.3x the floor, and what was done about each."""
    over = [x for source in SOURCES for x in source(target) if x.model_us(target) > 1.3 * x.floor_us(target)]
    lines = [f"Predicted to miss 1.3x of the floor on {target} (model / floor):", ""]
    lines += [f"- {x.kernel}, {x.shape}: {x.model_us(target) / x.floor_us(target):.2f}x ({x.note})" for x in over]
    lines += [
        "",
        "What was done, and why what is left misses:",
        "- T=1 `linear_entropy` (V-Reason's update) runs `ops/linear_entropy/triton_decode.py`: W",
        "  streamed once with h, A and B in registers (the 'decode' rows, 1.01x). The one-pass",
        "  kernel it replaced there re-read each W tile and kept A/B in a global slab (1.51x).",
        "- The gradient of T > 1 rows no longer runs the one-pass kernel, whose fp32 A/B slab is",
        "  read and written per vocabulary tile and row (8 B per W byte at T=16, 256 at T=4096,",
        "  out of L2: 9x and 8x). `ops/linear_entropy/triton_chunked.py` takes the row",
        "  statistics first and then dH/dh = G W as a plain product, per chunk of rows",
        "  (fp32 logits scratch <= 512 MiB): 2x at T=16 and 1.7-2.1x at T=4096.",
        "  - T=16 stays at 2x because W is read twice. One read needs the online A/B of all 16",
        "    rows on chip, 2 x 16 x D x 4 B = 459 KB at 7B: more than an SM's registers or shared",
        "    memory. A cluster of SMs sharing it through distributed shared memory could; Triton",
        "    does not expose that. Not on V-Reason's per-token path.",
        "  - T=4096 is arithmetic, and half of it (G W) runs at tf32, half the bf16 rate, because",
        "    G is kept in fp32 (as precise as the one-pass kernel). Predicted: G rounded to bf16",
        "    takes 7B from 1.84x to about 1.33x; folding the statistics into the logits GEMM's",
        "    epilogue saves another 0.16 ms of 2.8 ms per chunk. Both are for a GPU to decide.",
        "- The weight gradient computes the logits once (it recomputed them per D tile: 8-33x",
        "  at T=4096): 1.00-1.02x at T <= 16; 1.6-1.8x at T=4096, where dW (fp32, 2.2 GB at 7B)",
        "  is read and written again by each of the 6 chunks, and G^T h runs at tf32. A larger",
        "  SCRATCH_BYTES trades memory for those passes.",
        "- The one-pass kernel with A/B still serves the vocabulary-parallel op's slices",
        "  (`vreason_kernels.distributed`), which fold each slice's A and B across ranks: at T > 1",
        "  it keeps its 8-9x. A statistics-first variant needs a second collective per call.",
        "",
        "None of the misses is on V-Reason's per-token path (T=1, W frozen). Value-delta",
        "attention is within 1.3x everywhere.",
        "",
    ]
    return lines


def write_report(rows, path=RESULTS) -> None:
    versions = f"triton {triton.__version__}, torch {torch.__version__}"
    text = [
        "# Triton kernels compiled for Hopper and Ampere, without a GPU",
        "",
        f"Generated {datetime.date.today().isoformat()} with {versions}. Compiled ahead of time on CPU,",
        "not run on a GPU: every number below is from the compiler or from a model, none is measured.",
        "",
        "Regenerate with `python benchmarks/triton_resources.py` (compiled with",
        "`triton.compile(ASTSource(...), target=GPUTarget('cuda', cc, 32))`, resources read with the",
        "wheel's `cuobjdump --dump-resource-usage`). Launch configurations come from the launchers'",
        "own functions; `python_tests/test_triton_compile.py` asserts the same checks in CI.",
        "",
        "Columns: REG = registers per thread; STACK = per-thread stack frame (register spills; Triton",
        "makes no calls); LOCAL = local memory per thread; SHARED = static + dynamic shared memory per",
        "block. Verdict checks: compiles; SHARED within the per-block limit (sm_90 227 KB, sm_80 163 KB);",
        "REG x threads <= 65536 (one block fits an SM); decode-path kernels (T=1 linear_entropy, decode",
        "attention) neither spill nor use local memory. One row per distinct compiled kernel; the shapes",
        "column lists the docs/design.md §6 shapes that launch it.",
        "",
        "## Bytes moved per launch, against the floor (bf16)",
        "",
        "A model, not a measurement: bytes each launch must move given its grid and tiles. 'floor' is",
        "what any implementation must move (W once; K, V and delta once per pass); 'model HBM' adds",
        "scratch slabs and re-reads that miss L2 (a working set is taken to stay in L2 only if it fits",
        f"{L2_USABLE:.0%} of it: {L2_BYTES['sm_90'] >> 20} MB on H100, {L2_BYTES['sm_80'] >> 20} MB on A100). "
        "'L2 requests' counts the re-reads meant to hit L2. Floor times use "
        f"{TARGETS['sm_90'][3]} GB/s (H100) and {TARGETS['sm_80'][3]} GB/s (A100).",
        "",
    ]
    text += _misses("sm_90")
    for target in TARGETS:
        text += [f"### {target}", "", *_traffic_table(target), ""]
    text += ["## Resources per compiled kernel", "", *_spill_summary(rows), *_resource_table(rows), ""]
    path.write_text("\n".join(text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=pathlib.Path, help="write the raw rows here instead of the report")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--target", choices=tuple(TARGETS), action="append", help="default: all")
    parser.add_argument("--cover", action="store_true",
                        help="compile only the CI subset (triton_aot.cover); needs --json (the report lists all)")
    args = parser.parse_args(argv)
    if args.cover and not args.json:
        parser.error("--cover needs --json: the report is of every compile")
    rows = compile_all(tuple(args.target or TARGETS), jobs=args.jobs, everything=not args.cover)
    if args.json:
        args.json.write_text(json.dumps(rows))
    else:
        write_report(rows)
    bad = [(r["target"], r["kernel"], r["config"], p) for r in rows for p in check(r)]
    for item in bad:
        print("FAIL", *item, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
