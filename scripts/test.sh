#!/usr/bin/env bash
# The one test command: builds everything and runs every test on a fresh
# machine — formatting and lints, the Rust tests, the header freshness
# check, the C/C++ tests (CMake + ctest, also under valgrind), the Python
# package (python/, type-checked with mypy --strict and pip-installed into
# build/venv) with its tests and the FFI tests, and the interop tests against
# PyTorch itself. Installs the system packages and the Python packages
# (pytest, mypy, torch, in build/venv) it needs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "system packages"
missing=()
# ip and iptables: the client fault tests cut a network namespace off.
# etcd: the EtcdStore tests start real etcd members (they fail without it).
# socat: the benchmark's floor for the proxy (a plain byte relay).
for tool in cmake:cmake pkg-config:pkg-config valgrind:valgrind g++:g++ python3:python3 \
            ip:iproute2 iptables:iptables etcd:etcd-server socat:socat; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

step "format and lints"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

step "build (regenerates include/distcore.h)"
cargo build --release
if git rev-parse --git-dir >/dev/null 2>&1; then
  if ! git diff --exit-code --stat -- include/distcore.h ||
     [ -n "$(git ls-files --others --exclude-standard include/distcore.h)" ]; then
    echo "include/distcore.h is stale or uncommitted: commit the regenerated header" >&2
    exit 1
  fi
fi

step "Rust tests"
cargo test --release

step "install into build/prefix"
scripts/install.sh "$root/build/prefix"

step "C and C++ tests (find_package(distcore), ctest, valgrind)"
rm -rf build/c-tests
cmake -S c-tests -B build/c-tests -DCMAKE_PREFIX_PATH="$root/build/prefix" -DCMAKE_BUILD_TYPE=Debug
cmake --build build/c-tests -j "$(nproc)"
(cd build/c-tests && ctest --output-on-failure -j "$(nproc)")

step "Python package (mypy --strict, pip install ./python into build/venv) and its tests"
# The package ships py.typed: its source is type-checked (python/pyproject.toml
# has the settings). The package's own build runs cargo and bundles the
# library; the tests load the installed build/prefix library instead
# (DISTCORE_LIB), so that is what is tested.
venv="$root/build/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check pytest prometheus_client mypy
# distcore.torch and distcore.rendezvous are checked against torch's own types:
# torch is installed before mypy runs, not only for the interop step below
# (with numpy, which torch's all_gather_object needs and does not install).
if ! "$venv/bin/python" -c "import torch.distributed, numpy" 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check torch numpy
fi
"$venv/bin/python" -m mypy --strict --config-file python/pyproject.toml python/distcore
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./python
DISTCORE_LIB="$root/build/prefix/lib/libdistcore.so" \
  "$venv/bin/python" -m pytest -v -p no:cacheprovider --rootdir "$root" python/tests interop/test_ffi_*.py

step "PyTorch interop (torch from pip, CPU, in build/venv, installed above)"
DISTCORE_LIB="$root/build/prefix/lib/libdistcore.so" \
  "$venv/bin/python" -m pytest -v -p no:cacheprovider --rootdir "$root" interop/test_torch_*.py

step "benchmark smoke run (benches/bench.py --quick: figures, not pass/fail)"
"$venv/bin/python" benches/bench.py --quick

step "CLI demo"
build/prefix/bin/distcore demo --workers 8
build/prefix/bin/distcore demo --store hash
build/prefix/bin/distcore demo --store "file:$root/build/demo.filestore"

echo; echo "all tests passed"
