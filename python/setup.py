"""Builds the Rust library with cargo and bundles it in the package.

`pip install ./python` (from the repository) runs `cargo build --release
--lib` on ../Cargo.toml and copies the cdylib cargo reports into the wheel
as distcore/_libdistcore.so. The wheel is tagged py3-none-<platform>: it
holds a native library but no Python extension, so any Python 3 can use it.

Environment:
  CARGO                  the cargo to run (default: cargo on PATH)
  CARGO_TARGET_DIR       honoured by cargo as usual
  DISTCORE_PREBUILT_LIB  bundle this libdistcore.so instead of running cargo
"""
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MANIFEST = os.path.join(ROOT, "Cargo.toml")
LIB_NAME = "_libdistcore.so"


def crate_version():
    if not os.path.exists(MANIFEST):
        sys.exit(f"distcore: {MANIFEST} not found: build the package from the repository "
                 "(pip install ./python), which holds the Rust crate")
    with open(MANIFEST, encoding="utf-8") as f:
        in_package = False
        for line in f:
            line = line.strip()
            if line.startswith("["):
                in_package = line == "[package]"
            m = re.match(r'version\s*=\s*"([^"]+)"', line)
            if in_package and m:
                return m.group(1)
    raise RuntimeError(f"no [package] version in {MANIFEST}")


def cargo_build():
    """Runs cargo and returns the path of the cdylib it built."""
    prebuilt = os.environ.get("DISTCORE_PREBUILT_LIB")
    if prebuilt:
        return prebuilt
    cargo = os.environ.get("CARGO") or shutil.which("cargo")
    if not cargo:
        sys.exit("distcore: building the package needs cargo (https://rustup.rs), "
                 "or DISTCORE_PREBUILT_LIB=/path/to/libdistcore.so")
    cmd = [cargo, "build", "--release", "--lib", "--manifest-path", MANIFEST,
           "--message-format=json-render-diagnostics"]
    print("distcore: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"distcore: cargo failed ({proc.returncode})")
    built = None
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg.get("target", {}).get("kind", []):
            built = next((f for f in msg.get("filenames", []) if f.endswith((".so", ".dylib"))), built)
    if not built:
        sys.exit("distcore: cargo did not report the cdylib it built")
    return built


class BuildPyWithLib(build_py):
    """build_py that also builds the Rust library and copies it, with the
    version it was built for, into the package."""

    def run(self):
        super().run()
        version = crate_version()
        lib = cargo_build()
        target = HERE if getattr(self, "editable_mode", False) else self.build_lib
        pkg = os.path.join(target, "distcore")
        os.makedirs(pkg, exist_ok=True)
        dest = os.path.join(pkg, LIB_NAME)
        shutil.copyfile(lib, dest)
        os.chmod(dest, 0o755)
        with open(os.path.join(pkg, "_build_info.py"), "w", encoding="utf-8") as f:
            f.write(f'"""Written by setup.py."""\n__version__ = "{version}"\nBUILT_FROM = {lib!r}\n')

    def get_outputs(self, include_bytecode=True):
        pkg = os.path.join(self.build_lib, "distcore")
        return super().get_outputs(include_bytecode) + [os.path.join(pkg, LIB_NAME),
                                                        os.path.join(pkg, "_build_info.py")]


class BinaryDistribution(Distribution):
    """The wheel holds a native library: platform-specific."""

    def has_ext_modules(self):
        return True


class BdistWheelAnyPython(bdist_wheel):
    """py3-none-<platform>: the library is loaded with ctypes, not as an extension."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    version=crate_version(),
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPyWithLib, "bdist_wheel": BdistWheelAnyPython},
)
