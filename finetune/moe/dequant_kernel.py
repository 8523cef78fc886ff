"""One kernel launch for a strided piece of a packed 4-bit expert stack (Triton, on a GPU).

The grouped kernel dequantizes chunk c of every expert's w1 and w3 rows (or of its w2 columns) at a time. In the
packed data the rows are 2 runs per expert (16 for Mixtral's 8 experts) and the columns one run per row of w2, so
bitsandbytes' dequantize, which reads one contiguous run, takes one call per run (each one host work and a launch)
or one call on a gathered copy of the packed bytes (a quarter of the chunk's dense size, alive while the chunk is
made). This kernel reads the runs where they lie and writes the dense [E, G, R, C] tensor in one launch, into
rows and expert blocks that may be spaced wider (the grouped kernel puts adapter columns after each dequantized row,
or adapter rows after each expert's block):

    out[e, g, r, col] = code[nibble(src)] * scales[src // blocksize],  src = base + e*se + g*sg + r*sr + col

in 4-bit element units, the first element of each byte in its high nibble, the product taken in float32 and
rounded once to the output's dtype: what bitsandbytes computes.

FINETUNE_STRIDED_DEQUANT=0 in the environment turns it off (bitsandbytes' calls instead).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch

SWITCH_ENV = "FINETUNE_STRIDED_DEQUANT"
TILE_ROWS, TILE_COLS = 4, 1024  # output rows and columns per program


def on_its_device(t: torch.Tensor):
    """The context a Triton launch on `t` needs: Triton launches on torch's current CUDA device, not the tensors'."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def strided_dequantizer() -> Callable | None:
    """The launcher (compiled for the GPU), or None without triton or when the environment turns it off."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return None
    return _compiled()


@functools.cache
def _compiled() -> Callable | None:
    return make_strided_dequantizer()


def make_strided_dequantizer(tile_rows: int = TILE_ROWS, tile_cols: int = TILE_COLS) -> Callable | None:
    """A new launcher (tiles: powers of 2); with TRITON_INTERPRET=1 in the environment, one that runs on CPU
    tensors (for tests)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequantize_4bit_strided(data_ptr, scales_ptr, code_ptr, out_ptr, total, groups, rows, cols, out_stride_e,
                                out_stride_r, stride_e, stride_g, stride_r, base, TILE_ROWS: tl.constexpr,
                                TILE_COLS: tl.constexpr, BLOCKSIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS)[:, None]  # of E x G x R
        col = tl.program_id(1).to(tl.int64) * TILE_COLS + tl.arange(0, TILE_COLS)[None, :]
        mask = (row < total) & (col < cols)
        r = row % rows
        g = (row // rows) % groups
        e = row // (rows * groups)
        src = base + e * stride_e + g * stride_g + r * stride_r + col
        byte = tl.load(data_ptr + src // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(src % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0) * tl.load(scales_ptr + src // BLOCKSIZE, mask=mask,
                                                                            other=0.0)
        out_offset = e * out_stride_e + (row - e * rows * groups) * out_stride_r + col
        tl.store(out_ptr + out_offset, value.to(out_ptr.dtype.element_ty), mask=mask)

    def launch(data: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, out: torch.Tensor, base: int,
               strides: tuple[int, int, int], blocksize: int) -> torch.Tensor:
        """Fill `out` [E, G, R, C] (each expert's G x R rows of C values evenly spaced, the experts' blocks too:
        contiguous, or padded) from `data` (packed uint8), `scales` (float32, one per block of `blocksize`) and
        `code` (the 16 float32 values); `strides` (se, sg, sr) and `base` in 4-bit elements."""
        if data.dtype != torch.uint8 or scales.dtype != torch.float32 or code.dtype != torch.float32:
            raise ValueError(f"expected uint8 data and float32 scales and code, got {data.dtype}, {scales.dtype}, "
                             f"{code.dtype}")
        experts, groups, rows, cols = out.shape
        stride_e, row_stride = out.stride(0), out.stride(2)
        if (out.stride(1) != rows * row_stride or out.stride(3) != 1 or row_stride < cols
                or stride_e < groups * rows * row_stride):
            raise ValueError(f"the output's rows must be evenly spaced, got strides {out.stride()} for shape "
                             f"{tuple(out.shape)}")
        if not (data.is_contiguous() and scales.is_contiguous()):
            raise ValueError("the data and scales must be contiguous")
        if len({t.device for t in (data, scales, code, out)}) > 1:
            raise ValueError(f"data, scales, code and out on different devices: {data.device}, {scales.device}, "
                             f"{code.device}, {out.device}")
        total = experts * groups * rows
        if total * cols == 0:
            return out
        # the kernel reads unchecked: past the end a GPU faults or reads another tensor's bytes (the interpreter
        # reads them silently)
        last = base + sum((n - 1) * s for n, s in zip((experts, groups, rows), strides)) + cols - 1
        if (min(base, *strides) < 0 or last >= 2 * data.numel() or last // blocksize >= scales.numel()
                or code.numel() < 16):
            raise ValueError(f"elements {base}..{last} (strides {strides}) are not all in the {2 * data.numel()} "
                             f"packed values, {scales.numel()} scales of {blocksize} and {code.numel()} code values")
        grid = (triton.cdiv(total, tile_rows), triton.cdiv(cols, tile_cols))
        with on_its_device(out):
            dequantize_4bit_strided[grid](data, scales, code, out, total, groups, rows, cols, stride_e, row_stride,
                                          *strides, base, TILE_ROWS=tile_rows, TILE_COLS=tile_cols, BLOCKSIZE=blocksize)
        return out

    return launch
