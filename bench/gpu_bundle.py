"""What travels to a lent GPU machine for `make gpu-check`: the packages its image lacks, in one archive.

    python bench/gpu_bundle.py [--out .gpu]    # make gpu-bundle; then docs/guides/gpu-check.md

The lent machines (one H100 or H200, no network) run Python 3.12 with CUDA builds of torch, transformers, peft
and accelerate, but not Ray, bitsandbytes, pydantic, datasets or xgrammar, and a call carries at most 64 MiB.
This resolves what lorafleet imports for Python 3.12 on manylinux x86-64 (pip's resolver, dry run), keeps the
packages that image does not hold (`DEVICE_HAS`, its package list), installs them into a folder, drops what
the check never loads (Ray's Java jar, dashboard front end and RLlib; bitsandbytes' libraries for CUDA 11/12
and ROCm: the image's torch is a CUDA 13 build), and packs the folder as .gpu/site.tar.xz, printing the sizes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 * 2**20  # the device tool's working tree + carried paths, per call
REQUIREMENTS = ["ray[train,serve]==2.60.0", "bitsandbytes==0.50.2", "pydantic==2.14.4", "datasets==5.2.0", "xgrammar==0.2.8", "jsonschema>=4.20"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
# The image's packages (the device tool's KINDS.md), which the archive leaves out; torch, CUDA and Triton too.
DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
DEVICE_PREFIXES = ("nvidia-", "cuda-")
# Never loaded by the check: Ray's Java worker, dashboard front end, RLlib; bitsandbytes for other GPU stacks.
PRUNED = ["ray/jars", "ray/dashboard/client/build", "ray/rllib", "ray/cpp", "ray/tests"]
BNB_KEPT = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def resolve(work: Path) -> list[str]:
    """name==version of every package the requirements need on Python 3.12 that the image lacks."""
    report = work / "report.json"
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--target", str(work / "resolve"),
        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platform_args, *REQUIREMENTS)
    packages = [item["metadata"] for item in json.loads(report.read_text())["install"]]
    return sorted(f"{p['name']}=={p['version']}" for p in packages
                  if _normal(p["name"]) not in DEVICE_HAS and not _normal(p["name"]).startswith(DEVICE_PREFIXES))


def install(pins: list[str], site: Path) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("install", "--quiet", "--no-deps", "--no-compile", "--target", str(site), "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", *platform_args, *pins)
    for folder in PRUNED:
        shutil.rmtree(site / folder, ignore_errors=True)
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_*.so"):
        if not BNB_KEPT.search(lib.name):
            lib.unlink()
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts point at this machine's interpreter


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu")
    args = parser.parse_args()
    work = args.out / "build"
    shutil.rmtree(args.out, ignore_errors=True)
    work.mkdir(parents=True)
    pins = resolve(work)
    site = work / "site"
    install(pins, site)
    archive = args.out / "site.tar.xz"
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        tar.add(site, arcname="site")
    shutil.rmtree(work)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    files = [REPO / f for f in listed if f and (REPO / f).is_file()]
    tree, tracked = len(files), sum(f.stat().st_size for f in files)
    total = tracked + _size(archive)
    print(f"\npackages carried ({len(pins)}): {' '.join(pins)}")
    print(f"| what | size |\n| --- | ---: |\n| .gpu/site.tar.xz | {_size(archive) / 2**20:.1f} MiB |"
          f"\n| the repository's {tree} tracked files | {tracked / 2**20:.1f} MiB |\n| one call, together | {total / 2**20:.1f} MiB of {CALL_LIMIT / 2**20:.0f} |")
    if total > CALL_LIMIT:
        print("over one call's limit: split the archive over two calls (docs/guides/gpu-check.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
