"""Re-execute notebooks in place, so their saved outputs are the current library's.

    python notebooks/run_notebooks.py                    # all, full setting (minutes each)
    python notebooks/run_notebooks.py 03_geometry.ipynb  # one
    LM_PROBE_NOTEBOOK_SMALL=1 python notebooks/run_notebooks.py --check   # small setting, nothing written

Each notebook runs in a fresh kernel of this interpreter, in a temporary working folder, top to
bottom; the first error stops it and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def this_interpreter(folder: Path) -> AsyncKernelManager:
    """A kernel manager whose kernel is ``sys.executable`` (not whatever ``python3`` Jupyter finds)."""
    (folder / "this").mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}
    (folder / "this" / "kernel.json").write_text(json.dumps(spec))
    return AsyncKernelManager(kernel_name="this", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every *.ipynb here)")
    parser.add_argument("--check", action="store_true", help="run without writing the outputs back")
    args = parser.parse_args()
    paths = [HERE / Path(p).name for p in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    small = os.environ.get("LM_PROBE_NOTEBOOK_SMALL") == "1"
    if small and not args.check:
        parser.error("LM_PROBE_NOTEBOOK_SMALL=1 is set: the saved outputs must come from the full setting "
                     "(unset it, or pass --check)")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as specs:
            NotebookClient(nb, km=this_interpreter(Path(specs)), timeout=1800, record_timing=False,
                           resources={"metadata": {"path": workdir}}).execute(cleanup_kc=True)
        if not args.check:
            nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s{'' if args.check else ', written'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
