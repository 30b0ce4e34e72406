"""The GPU benchmarks run only on the GPU machine; here each is started with ``--help`` so that a broken import or
argument parser (e.g. after moving a shared helper into ``bench/_timing.py``) shows on the CPU, before device time is
spent on it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_benchmark_parses_its_arguments():
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py"))
    assert "bench_sample.py" in scripts and "bench_train.py" in scripts
    # one interpreter for all of them (torch is imported once); each must exit 0 on --help after printing its usage
    code = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        sys.path.insert(0, {str(BENCH)!r})
        for name in {scripts!r}:
            sys.argv = [name, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path({str(BENCH)!r} + "/" + name, run_name="__main__")
            except SystemExit as e:
                assert e.code in (0, None), (name, e.code)
            else:
                raise AssertionError(name + " did not stop at --help")
            assert "usage:" in out.getvalue(), name
            print("ok", name)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for name in scripts for w in ("ok", name)]
