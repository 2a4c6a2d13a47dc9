"""The ABI guard: fails when the installed library or header breaks a
program built against an earlier distcore of the same major version.

    check_abi.py HEADER LIBRARY ABI_DIR            check
    check_abi.py HEADER LIBRARY ABI_DIR --update   rewrite ABI_DIR's lists

ABI_DIR/symbols.txt lists every exported dc_ function; ABI_DIR/types.txt
every public struct's size and field offsets (as the C compiler lays them
out) and every constant's value. The check fails when
- an exported function disappeared, or the header declares one the library
  does not export;
- a struct's field moved or changed size, or a struct grew, other than by
  fields appended to one that starts with `struct_size` (the versioned
  options and stats structs);
- a constant disappeared or changed its value (DC_VERSION_* excepted);
and, so that the lists stay the record of the ABI, when anything was added
that they do not list yet (run with --update, and commit the lists).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

header, library, abi_dir = sys.argv[1:4]
update = "--update" in sys.argv[4:]
text = open(header).read()
code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
code = re.sub(r"//[^\n]*", "", code)


def exported_functions():
    out = subprocess.run(["nm", "-D", "--defined-only", library], check=True,
                         capture_output=True, text=True).stdout
    return sorted({line.split()[-1] for line in out.splitlines()
                   if re.match(r"\S+ T dc_", line)})


def declared_functions():
    return sorted(set(re.findall(r"\b(dc_\w+)\s*\([^;{)]*\)\s*;", code)))


def structs():
    """{name: [field, ...]} of the header's typedef'd structs."""
    found = {}
    for body, name in re.findall(r"typedef struct\s*\w*\s*{([^}]*)}\s*(\w+)\s*;", code):
        fields = [re.findall(r"(\w+)\s*(?:\[[^\]]*\])?$", decl.strip())[0]
                  for decl in body.split(";") if decl.strip()]
        found[name] = fields
    return found


def constants():
    names = set(re.findall(r"#define\s+(DC_\w+)\s+\S", code))
    for body in re.findall(r"enum\s*\w*[^{;]*{([^}]*)}", code):
        names |= set(re.findall(r"^\s*(DC_\w+)", body, flags=re.M))
    return sorted(names)


def measure():
    """types.txt lines, measured by compiling against the header."""
    lines = []
    for name, fields in sorted(structs().items()):
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof({name}));')
        for f in fields:
            lines.append(f'printf("{name}.{f} %zu %zu\\n", offsetof({name}, {f}), '
                         f'sizeof((({name} *)0)->{f}));')
    for c in constants():
        lines.append(f'printf("{c} = %lld\\n", (long long)({c}));')
    program = ("#include <stddef.h>\n#include <stdio.h>\n"
               f'#include "{os.path.abspath(header)}"\n'
               "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "abi.c"), os.path.join(tmp, "abi")
        open(src, "w").write(program)
        subprocess.run([cc, "-std=c99", "-o", exe, src], check=True)
        return subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()


def read(name):
    path = os.path.join(abi_dir, name)
    return [l for l in open(path).read().splitlines() if l and not l.startswith("#")]


def write(name, header_line, lines):
    with open(os.path.join(abi_dir, name), "w") as f:
        f.write(header_line + "\n" + "\n".join(lines) + "\n")


symbols, types = exported_functions(), measure()
if update:
    write("symbols.txt", "# Exported functions of libdistcore (c-tests/check_abi.py --update).", symbols)
    write("types.txt", "# Struct layouts and constants of distcore.h (c-tests/check_abi.py --update).", types)
    sys.exit(0)

problems, additions = [], []

# Functions.
recorded = read("symbols.txt")
for name in sorted(set(recorded) - set(symbols)):
    problems.append(f"exported function {name} disappeared")
for name in sorted(set(declared_functions()) - set(symbols)):
    problems.append(f"the header declares {name}, which the library does not export")
additions += [f"new function {n}" for n in sorted(set(symbols) - set(recorded))]

# Structs and constants.
def parse(lines):
    layout, sizes, values = {}, {}, {}
    for line in lines:
        if " = " in line:
            name, value = line.split(" = ")
            values[name] = value
        elif " sizeof " in line:
            name, _, size = line.split()
            sizes[name] = int(size)
        else:
            field, offset, size = line.split()
            layout[field] = (int(offset), int(size))
    return layout, sizes, values

old_layout, old_sizes, old_values = parse(read("types.txt"))
new_layout, new_sizes, new_values = parse(types)
for field, where in old_layout.items():
    if field not in new_layout:
        problems.append(f"field {field} disappeared")
    elif new_layout[field] != where:
        problems.append(f"field {field} moved or changed size: (offset, size) {where} -> {new_layout[field]}")
for struct, size in old_sizes.items():
    if struct not in new_sizes:
        problems.append(f"struct {struct} disappeared")
    elif new_sizes[struct] != size:
        versioned = old_layout.get(f"{struct}.struct_size", (None,))[0] == 0
        if versioned and new_sizes[struct] > size:
            additions.append(f"{struct} grew from {size} to {new_sizes[struct]} bytes (appended fields)")
        else:
            problems.append(f"struct {struct} changed size {size} -> {new_sizes[struct]} "
                            "(only structs that start with struct_size may grow, by appending)")
additions += [f"new struct {s}" for s in sorted(set(new_sizes) - set(old_sizes))]
additions += [f"new field {f}" for f in sorted(set(new_layout) - set(old_layout))
              if f.split(".")[0] in old_sizes]
for name, value in old_values.items():
    if name.startswith("DC_VERSION_"):
        continue
    if name not in new_values:
        problems.append(f"constant {name} disappeared")
    elif new_values[name] != value:
        problems.append(f"constant {name} changed: {value} -> {new_values[name]}")
additions += [f"new constant {n}" for n in sorted(set(new_values) - set(old_values))]

if problems:
    sys.exit("ABI break against abi/ (a new major version would be needed):\n  "
             + "\n  ".join(problems))
if additions:
    sys.exit("compatible additions that abi/ does not record yet; run "
             "`python3 c-tests/check_abi.py include/distcore.h target/release/libdistcore.so abi "
             "--update` and commit abi/:\n  " + "\n  ".join(additions))
print(f"ABI intact: {len(symbols)} functions, {len(new_sizes)} structs, {len(new_values)} constants")
