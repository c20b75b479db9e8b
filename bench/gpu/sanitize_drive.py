"""Drive every GPU kernel family once, small, for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck python bench/gpu/sanitize_drive.py --device cuda
    TRITON_INTERPRET=1 python bench/gpu/sanitize_drive.py --device cpu --tiny    # CPU dry run

For each fused backend (``triton`` and ``cuda`` on a GPU; ``triton`` through the
interpreter and the C++ ``cpu`` kernel on CPU), on rows that fit one tile
(C = 1000) and rows that are streamed (C = 40000; ``--tiny``: 100 and 5000):
every loss x every reduction x float32/bfloat16, with class weights and
``ignore_index`` rows, forward + backward against the reference backend on the
same device; then strided and sliced logits, transposed logits (class stride
!= 1), ``(N, C, d)`` logits, ``L.sum()`` (an expanded ``grad_output``) and a
non-unit ``grad_output``, int32 targets, label smoothing, float16, the
standalone backward kernel from saved row statistics, a forward without grad,
``N = 0``, ``inplace_backward`` (triton), and bad targets: on a GPU a NaN row
with every other row finite (and ``IndexError`` under ``FUSEDLOSS_STRICT=1``),
on CPU an ``IndexError``.

The numbers are checked loosely (max abs difference over the reference's
largest magnitude: 1e-4 for float32, 3e-2 for 16-bit): the precise checks are
the test suite's; this script exists so that every kernel runs under the
sanitizer. Exit status 0 when every case passed, 1 otherwise; ``--json``
writes one record per case, rewritten (atomically) after every case, so a run
cut short (gpucheck's budget) still leaves what it did: ``"complete": false``
until the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import fusedloss as fl
from fusedloss import dispatch
from fusedloss.variants import reduction_id, variant_id

HYPER = {"alpha": 1.5, "beta": 1.0, "gamma": 2.0}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2, torch.float64: 1e-9}


class Driver:
    def __init__(self, device: torch.device, tiny: bool, json_path: Path | None = None) -> None:
        self.device = device
        self.tiny = tiny
        self.json_path = json_path
        self.skipped: dict[str, str] = {}
        self.results: list[dict[str, object]] = []
        self.gen = torch.Generator().manual_seed(0)
        self.shapes = [(8, 100), (3, 5000)] if tiny else [(64, 1000), (8, 40000)]

    # -- helpers -------------------------------------------------------------
    def data(self, n: int, c: int, dtype: torch.dtype, weighted: bool = True):
        x = (3 * torch.randn(n, c, generator=self.gen)).to(dtype).to(self.device)
        t = torch.randint(0, c, (n,), generator=self.gen)
        if n > 2:
            t[::5] = -100
        w = (0.5 + torch.rand(c, generator=self.gen)).to(self.device) if weighted else None
        return x, t.to(self.device), w

    def record(self, name: str, backend: str, ok: bool, err: float | None = None, detail: str = "") -> None:
        self.results.append({"case": name, "backend": backend, "ok": bool(ok), "err": err, "detail": detail})
        if not ok:
            print(f"FAIL {backend} {name}: err={err} {detail}", flush=True)
        self.save()

    def save(self, complete: bool = False) -> None:
        """The JSON so far (``--json``), replaced atomically: a reader never sees half a file."""
        if self.json_path is None:
            return
        doc = {"device": str(self.device), "tiny": self.tiny, "complete": complete, "skipped": self.skipped,
               "cases": len(self.results), "failed": sum(not r["ok"] for r in self.results),
               "results": self.results}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.json_path)

    @staticmethod
    def rel_err(a: torch.Tensor, b: torch.Tensor, finite_rows: torch.Tensor | None = None) -> float:
        a, b = a.detach().double(), b.detach().double()
        if finite_rows is not None:
            a, b = a[finite_rows], b[finite_rows]
        if a.numel() == 0:
            return 0.0
        if not torch.isfinite(a).all() or not torch.isfinite(b).all():
            same = torch.isnan(a) == torch.isnan(b)
            if not same.all():
                return float("inf")
            a, b = torch.nan_to_num(a), torch.nan_to_num(b)
        return float((a - b).abs().max() / (b.abs().max() + 1e-12))

    def run_pair(self, backend: str, x: torch.Tensor, t: torch.Tensor, loss: str, go: str = "ones",
                 **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, grad) of ``backend`` and of the reference on the same inputs."""
        outs = []
        for be in (backend, "reference"):
            xi = x.detach().clone().requires_grad_(True)
            out = fl.softmax_loss(xi, t, loss, backend=be, **HYPER, **kw)
            if go == "sum":
                out.sum().backward()                      # expanded grad_output (stride 0)
            elif go == "scaled":
                g = torch.linspace(0.5, 1.5, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
                out.backward(g)
            else:
                out.backward(torch.ones_like(out))
            outs += [out.detach(), xi.grad]
        return outs[0], outs[1], outs[2], outs[3]

    def check(self, name: str, backend: str, x: torch.Tensor, t: torch.Tensor, loss: str, **kw) -> None:
        try:
            out, grad, rout, rgrad = self.run_pair(backend, x, t, loss, **kw)
            tol = TOL[x.dtype]
            e = max(self.rel_err(out, rout), self.rel_err(grad, rgrad))
            self.record(name, backend, e <= tol, e)
        except Exception as exc:  # noqa: BLE001 - one case failing must not stop the others
            self.record(name, backend, False, None, f"{type(exc).__name__}: {str(exc)[:300]}")

    # -- the cases -----------------------------------------------------------
    def grid(self, backend: str) -> None:
        for n, c in self.shapes:
            for dtype in (torch.float32, torch.bfloat16):
                for i, loss in enumerate(fl.LOSSES):
                    if self.tiny and (i % 2 == 0) != (dtype == torch.float32):
                        continue  # --tiny: each loss in one dtype (the interpreter is slow)
                    x, t, w = self.data(n, c, dtype, weighted=(i % 2 == 0))
                    for red in ("none", "mean", "sum"):
                        self.check(f"{loss} {red} {str(dtype)[6:]} {n}x{c} weight={w is not None}",
                                   backend, x, t, loss, reduction=red, weight=w)

    def extras(self, backend: str) -> None:
        for n, c in self.shapes:
            tag = f"{n}x{c}"
            x, t, w = self.data(n, c, torch.float32)
            wide = torch.randn(2 * n, c + 13, generator=self.gen).to(self.device)
            self.check(f"sliced rows (row stride C+13) {tag}", backend, wide[:n, :c], t, "crl", weight=w)
            self.check(f"every other row (row stride 2C+26) {tag}", backend, wide[::2, :c], t, "bce")
            xt = torch.randn(c, n, generator=self.gen).to(self.device).t()
            self.check(f"transposed (class stride N) {tag}", backend, xt, t, "focal", reduction="sum")
            self.check(f"L.sum() expanded grad_output {tag}", backend, x, t, "lace", reduction="none", go="sum")
            self.check(f"non-unit grad_output {tag}", backend, x, t, "nllr", reduction="none", go="scaled")
            self.check(f"int32 targets {tag}", backend, x, t.to(torch.int32), "ce", weight=w)
            self.check(f"label smoothing 0.1 {tag}", backend, x, t, "ce", weight=w, label_smoothing=0.1)
            xh, th, _ = self.data(n, c, torch.float16, weighted=False)
            self.check(f"float16 {tag}", backend, xh, th, "focal")
            x3 = torch.randn(2, c, 3, generator=self.gen).to(self.device)
            t3 = torch.randint(0, c, (2, 3), generator=self.gen).to(self.device)
            self.check(f"(N, C, d) logits {tag}", backend, x3, t3, "crl", reduction="none")
            self.standalone_backward(backend, x, t, w, tag)
            self.no_grad_forward(backend, x, t, tag)
            self.bad_targets(backend, x, t, tag)
            if backend == "triton":
                self.inplace(backend, n, c, tag)
        self.check("N = 0", backend, torch.empty(0, 7, device=self.device),
                   torch.empty(0, dtype=torch.long, device=self.device), "ce", reduction="none")

    def standalone_backward(self, backend: str, x, t, w, tag: str) -> None:
        """The backward kernel that recomputes from (logits, row stats): forward without
        a fused gradient, then the ``<backend>_bwd`` op."""
        try:
            be, ref = dispatch.resolve(backend, self.device), dispatch.resolve("reference", self.device)
            errs = []
            for loss in ("ce", "bce"):
                for red in ("none", "mean"):
                    args = (int(variant_id(loss)), int(reduction_id(red)), -100, 0.0,
                            HYPER["alpha"], HYPER["beta"], HYPER["gamma"], 0.0, 0.0)
                    grads = []
                    for b in (be, ref):
                        out, stats, _ = b.one_target.fwd(x, t, w, *args, False)
                        go = torch.full_like(out, 0.75)
                        grads.append(b.one_target.bwd(go, x, t, w, stats, *args))
                    errs.append(self.rel_err(grads[0], grads[1]))
            self.record(f"standalone backward from stats {tag}", backend, max(errs) <= TOL[x.dtype], max(errs))
        except Exception as exc:  # noqa: BLE001
            self.record(f"standalone backward from stats {tag}", backend, False, None, f"{type(exc).__name__}: {exc}")

    def no_grad_forward(self, backend: str, x, t, tag: str) -> None:
        try:
            with torch.no_grad():
                a = fl.softmax_loss(x, t, "bce", backend=backend, reduction="none")
                b = fl.softmax_loss(x, t, "bce", backend="reference", reduction="none")
            e = self.rel_err(a, b)
            self.record(f"forward without grad {tag}", backend, e <= TOL[x.dtype], e)
        except Exception as exc:  # noqa: BLE001
            self.record(f"forward without grad {tag}", backend, False, None, f"{type(exc).__name__}: {exc}")

    def bad_targets(self, backend: str, x, t, tag: str) -> None:
        n, c = x.shape
        bad = t.clone()
        bad[1] = c + 5
        bad[-1] = -7
        rows = torch.ones(n, dtype=torch.bool, device=self.device)
        rows[1] = rows[-1] = False
        name = f"bad targets (C+5, -7) {tag}"
        if self.device.type == "cpu":
            try:
                fl.softmax_loss(x, bad, "ce", backend=backend)
                self.record(name, backend, False, None, "no IndexError on CPU")
            except IndexError:
                self.record(name, backend, True)
            except Exception as exc:  # noqa: BLE001
                self.record(name, backend, False, None, f"{type(exc).__name__}: {exc}")
            return
        os.environ.pop("FUSEDLOSS_STRICT", None)
        try:
            for loss in ("ce", "bce"):
                xi = x.detach().clone().requires_grad_(True)
                out = fl.softmax_loss(xi, bad, loss, backend=backend, reduction="none")
                out.sum().backward()
                out_c, grad_c = out.detach().cpu(), xi.grad.cpu()
                rows_c = rows.cpu()
                ok = bool(torch.isnan(out_c[~rows_c]).all() and torch.isfinite(out_c[rows_c]).all()
                          and torch.isfinite(grad_c[rows_c]).all())
                _, _, rout, rgrad = self.run_pair("reference", x[rows], t[rows], loss, reduction="none", go="sum")
                e = max(self.rel_err(out_c[rows_c], rout.cpu()), self.rel_err(grad_c[rows_c], rgrad.cpu()))
                self.record(f"{name} {loss}: NaN rows, others exact", backend, ok and e <= TOL[x.dtype], e,
                            "" if ok else f"losses {out_c.tolist()[:4]}...")
            os.environ["FUSEDLOSS_STRICT"] = "1"
            try:
                fl.softmax_loss(x, bad, "ce", backend=backend)
                self.record(f"{name} FUSEDLOSS_STRICT=1", backend, False, None, "no IndexError")
            except IndexError:
                self.record(f"{name} FUSEDLOSS_STRICT=1", backend, True)
        except Exception as exc:  # noqa: BLE001
            self.record(name, backend, False, None, f"{type(exc).__name__}: {exc}")
        finally:
            os.environ.pop("FUSEDLOSS_STRICT", None)

    def inplace(self, backend: str, n: int, c: int, tag: str) -> None:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"inplace_backward {str(dtype)[6:]} {tag}"
            try:
                x, t, w = self.data(n, c, dtype)
                leaf = x.clone().requires_grad_(True)
                out = fl.softmax_loss(leaf * 1.0, t, "crl", backend=backend, weight=w, inplace_backward=True, **HYPER)
                out.backward()
                _, _, rout, rgrad = self.run_pair("reference", x, t, "crl", weight=w)
                e = max(self.rel_err(out, rout), self.rel_err(leaf.grad, rgrad))
                self.record(name, backend, e <= TOL[dtype], e)
            except Exception as exc:  # noqa: BLE001
                self.record(name, backend, False, None, f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU interpreter dry run)")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: triton,cuda on a GPU, triton,cpu on CPU)")
    p.add_argument("--require", default="",
                   help="comma-separated backends whose absence is a failure (default: none)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    wanted = (a.backends or ("triton,cuda" if device.type == "cuda" else "triton,cpu")).split(",")
    required = {b for b in a.require.split(",") if b}
    drv = Driver(device, a.tiny, a.json)
    print(f"fusedloss from {Path(fl.__file__).parent}; available backends {fl.available_backends()}", flush=True)
    t0 = time.perf_counter()
    skipped = drv.skipped
    drv.save()
    for backend in wanted:
        reason = dispatch.unavailable_reason(backend, device)
        if reason is not None:
            skipped[backend] = reason
            print(f"{'FAIL' if backend in required else 'skip'} {backend}: {reason}", flush=True)
            if backend in required:
                drv.record("available", backend, False, None, reason)
            continue
        b0 = time.perf_counter()
        try:
            drv.grid(backend)
            drv.extras(backend)
        except Exception:  # noqa: BLE001
            drv.record("driver", backend, False, None, traceback.format_exc()[-500:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        n_b = sum(r["backend"] == backend for r in drv.results)
        print(f"{backend}: {n_b} cases in {time.perf_counter() - b0:.1f} s", flush=True)
    failed = [r for r in drv.results if not r["ok"]]
    print(f"sanitize_drive: {len(drv.results)} cases, {len(failed)} failed, "
          f"{time.perf_counter() - t0:.1f} s, device {device}, torch {torch.__version__}", flush=True)
    drv.save(complete=True)
    return 1 if failed or not drv.results else 0


if __name__ == "__main__":
    sys.exit(main())
