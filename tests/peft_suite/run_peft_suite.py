"""Run PEFT 0.21.2's own VeRA tests with vera_ext.patch_peft() in force.

    python tests/peft_suite/run_peft_suite.py [--cache DIR] [extra pytest args]

Runs ``tests/test_vera.py`` and ``tests/test_custom_models.py -k "vera and not pvera"`` from the peft 0.21.2
sdist (fetched once with ``pip download peft==0.21.2 --no-binary :all: --no-deps`` into the cache folder,
default ``~/.cache/vera_ext/peft_suite``). PEFT's test modules import ``diffusers`` and ``datasets``; when the
current interpreter lacks them, an overlay venv in the cache folder (which sees this environment's packages)
gets them with pip. Exit status: pytest's.
"""

import argparse
import os
import subprocess
import sys
import tarfile
import venv

PEFT_VERSION = "0.21.2"
HERE = os.path.dirname(os.path.abspath(__file__))
TEST_DEPS = ("diffusers", "datasets")


def fetch_sdist(cache: str) -> str:
    root = os.path.join(cache, f"peft-{PEFT_VERSION}")
    if not os.path.isdir(os.path.join(root, "tests")):
        archive = os.path.join(cache, f"peft-{PEFT_VERSION}.tar.gz")
        if not os.path.exists(archive):
            subprocess.check_call(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    f"peft=={PEFT_VERSION}",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "-d",
                    cache,
                ]
            )
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(cache, filter="data")
            else:  # Python without extraction filters
                tar.extractall(cache)
    # the sdist's tests/ is not a package, but test_custom_models.py uses relative imports
    open(os.path.join(root, "tests", "__init__.py"), "a").close()
    return root


def python_with_test_deps(cache: str) -> str:
    probe = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in %r))" % (TEST_DEPS,)
    if subprocess.call([sys.executable, "-c", probe]) == 0:
        return sys.executable
    env_dir = os.path.join(cache, "venv")
    python = os.path.join(env_dir, "bin", "python")
    if not os.path.exists(python):
        venv.create(env_dir, with_pip=True)
        site_dirs = subprocess.check_output(
            [sys.executable, "-c", "import site; print('\\n'.join(site.getsitepackages()))"], text=True
        ).split()
        out = subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"], text=True)
        with open(os.path.join(out.strip(), "outer_env.pth"), "w") as f:
            f.writelines(f"import site; site.addsitedir({d!r})\n" for d in site_dirs)
    if subprocess.call([python, "-c", probe]) != 0:
        subprocess.check_call([python, "-m", "pip", "install", "--quiet", *TEST_DEPS])
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/vera_ext/peft_suite"))
    args, pytest_args = parser.parse_known_args()
    os.makedirs(args.cache, exist_ok=True)
    root = fetch_sdist(args.cache)
    python = python_with_test_deps(args.cache)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    command = [
        python,
        "-m",
        "pytest",
        "tests/test_vera.py",
        "tests/test_custom_models.py",
        "-k",
        "vera and not pvera",
        "-p",
        "vera_ext_patch_plugin",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        "-q",
        *pytest_args,
    ]
    print("running:", " ".join(command), f"(in {root})", flush=True)
    return subprocess.call(command, cwd=root, env=env)


if __name__ == "__main__":
    sys.exit(main())
