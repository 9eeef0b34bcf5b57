"""The compiled CPU kernel for GRU populations (``gru_kernel.c``), built at first use.

On a CPU the operator path spends most of a DS1 step on small element-wise
operators, their calls and their memory traffic. The kernel does the same work
one network at a time, while that network's activations stay in cache:

- a whole training step of GRU + MLP networks with a BCE loss (forward, loss,
  and every gradient: :func:`gru_mlp_bce_step`) and the forward alone for
  evaluation (:func:`gru_mlp_forward`), used by
  :class:`mlds.nets.population.PopulationRecurrentNet`;
- the recurrent stack alone (:func:`gru_forward`, :func:`gru_backward`: the
  wavefront of :mod:`mlds.nets.recurrent` compiled), used by
  :func:`mlds.nets.recurrent.recurrent_stack_features`.

It is compiled with the system's C compiler (``$CC``, else Python's, else
``cc``; ``-O3 -march=native``) into a per-user cache (``$MLDS_CACHE``, else
``$XDG_CACHE_HOME/mlds``, else ``~/.cache/mlds``), keyed by the source, the
flags and the CPU (a home shared by a cluster's nodes keeps one build per CPU
kind), and loaded with ctypes. Without a compiler, or with ``MLDS_CPU_KERNEL=0``,
training uses the operator path, which stays the reference: both give the same
networks up to float rounding (``tests/test_recurrent.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("gru_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC"]
LANES = 16  # the kernel's vector width in floats (VL in gru_kernel.c): batches must be a multiple of it


def enabled() -> bool:
    """Whether training may use the kernel (``MLDS_CPU_KERNEL=0`` turns it off)."""
    return os.environ.get("MLDS_CPU_KERNEL", "1") != "0"


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if candidate:
            command = shlex.split(candidate)
            if command and shutil.which(command[0]):
                return command
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: a shared cache on a cluster keeps one build per CPU kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("MLDS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mlds")
    return Path(root) / "kernels"


def build() -> Path:
    """The compiled library (built now unless the cache holds it); raises if it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + FLAGS).encode(), _cpu_identity().encode()]))
    target = cache_dir() / f"gru_kernel-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: processes building at once never load half a file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with one warning) where it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"the compiled GRU kernel is unavailable ({err}); GRU networks train through the operator "
                      "path: the same networks, about 1.6x slower on a CPU", RuntimeWarning, stacklevel=3)
        return None
    ints = [ctypes.c_int] * 7
    lib.gru_forward.argtypes = [ctypes.c_void_p] * 3 + ints
    lib.gru_backward.argtypes = [ctypes.c_void_p] * 7 + ints + [ctypes.c_int]
    lib.gru_backward_work.restype = ctypes.c_size_t
    lib.gru_backward_work.argtypes = [ctypes.c_int] * 5
    lib.gru_mlp_work.restype = ctypes.c_size_t
    lib.gru_mlp_work.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 6
    lib.gru_mlp_step.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8)
    return lib


def usable(cell: str, batch: int, *tensors: Tensor) -> bool:
    """Whether the kernel runs this stack: GRU, a batch that is a multiple of ``LANES``, float32
    contiguous CPU tensors, enabled and built."""
    plain = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    return cell == "gru" and batch % LANES == 0 and plain and enabled() and library() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gru_forward(wp: Tensor, hc: Tensor, acts: Tensor, wb: int, t_len: int) -> None:
    """Fill ``acts`` and the states in ``hc`` (see ``gru_kernel.c`` for the layouts)."""
    n_layers, k, gw, width = wp.shape
    library().gru_forward(_ptr(wp), _ptr(hc), _ptr(acts), n_layers, k, gw // 4, width, wb, hc.shape[-1], t_len)


def gru_backward(wp: Tensor, hc: Tensor, acts: Tensor, grad_out: Tensor, dwp: Tensor, dx: Tensor | None,
                 wb: int, n_in: int) -> None:
    """Write ``dwp`` and ``dx`` (if given) from the saved ``hc``, ``acts`` and ``grad_out [K, H, T, B]``."""
    n_layers, k, gw, width = wp.shape
    hidden, t_len, batch = gw // 4, grad_out.shape[2], grad_out.shape[3]
    lib = library()
    work = wp.new_empty(lib.gru_backward_work(n_layers, hidden, width, batch, t_len))
    lib.gru_backward(_ptr(wp), _ptr(hc), _ptr(acts), _ptr(grad_out), _ptr(dwp), _ptr(dx), _ptr(work),
                           n_layers, k, hidden, width, wb, batch, t_len, n_in)


MAX_HEAD = 64  # head layers gru_mlp_step takes at most (MAX_HEAD in gru_kernel.c)


def _gru_mlp(x: Tensor, y: Tensor | None, wp: Tensor, mats: list[Tensor]):
    """``gru_mlp_step`` of the kernel: with targets ``y`` the loss and gradients, else the logits."""
    n_layers, k, gw, width = wp.shape
    hidden = gw // 4
    _, batch, t_len, n_in = x.shape
    if len(mats) > MAX_HEAD:
        raise ValueError(f"the compiled kernel takes at most {MAX_HEAD} head layers, not {len(mats)}")
    sizes = [hidden] + [m.shape[1] for m in mats]
    c_sizes = (ctypes.c_int * len(sizes))(*sizes)
    lib = library()
    work = wp.new_empty(lib.gru_mlp_work(c_sizes, len(mats), n_layers, hidden, width, batch, t_len))
    head = torch.cat([m.reshape(-1) for m in mats])
    if y is None:
        loss = dwp = dhead = None
        out = wp.new_empty(k, batch, t_len, sizes[-1])
    else:
        out = None
        dhead, loss, dwp = torch.empty_like(head), wp.new_empty(k), torch.empty_like(wp)
    lib.gru_mlp_step(_ptr(wp), _ptr(x), int(x.shape[0] == 1 and k > 1), _ptr(y), _ptr(head), c_sizes, len(mats),
                         _ptr(loss), _ptr(out), _ptr(dwp), _ptr(dhead), _ptr(work), n_layers, k, hidden, width,
                         width - hidden - 1, batch, t_len, n_in)
    if y is None:
        return out
    return loss, dwp, list(torch.split(dhead, [m.numel() for m in mats]))


def gru_mlp_bce_step(x: Tensor, y: Tensor, wp: Tensor, mats: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One training step's forward and backward of K GRU + MLP networks with a per-network mean BCE,
    a network at a time: ``(loss [K], dwp, [d mat])`` for ``x [1 or K, B, T, I]``, ``y [K, B, T, O]``,
    packed weights ``wp [L, K, 4H, W]`` and head matrices ``mats[i] [K, F(i+1), F(i) + 1]`` (weight | bias,
    ReLU between layers)."""
    return _gru_mlp(x, y, wp, mats)


def gru_mlp_forward(x: Tensor, wp: Tensor, mats: list[Tensor]) -> Tensor:
    """The logits ``[K, B, T, O]`` of the same networks (no gradients), a network at a time."""
    return _gru_mlp(x, None, wp, mats)
