"""The C++ wrapper's table of errors against the header's status codes,
which build.rs generates from the Rust enum (their one source): every
DC_ERR_* code has an error class in distcore.hpp and a case that throws it,
and the wrapper names no code the header lacks.

    check_status_tables.py HEADER HPP
"""
import re
import sys

header, hpp = (open(path).read() for path in sys.argv[1:3])
codes = set(re.findall(r"#define (DC_ERR_\w+) \d+", header))
classes = dict((code, name) for name, code in re.findall(r"DISTCORE_HPP_ERROR_CLASS\((\w+), (DC_ERR_\w+)\)", hpp))
thrown = dict(re.findall(r"case (DC_ERR_\w+): throw (\w+)\(", hpp))
problems = []
for code in sorted(codes):
    if code not in classes:
        problems.append(f"{code}: no DISTCORE_HPP_ERROR_CLASS in distcore.hpp")
    elif thrown.get(code) != classes[code]:
        problems.append(f"{code}: throw_error throws {thrown.get(code)}, not {classes[code]}")
for code in sorted((set(classes) | set(thrown)) - codes):
    problems.append(f"{code}: in distcore.hpp, not in distcore.h")
if not codes:
    problems.append("no DC_ERR_* code in the header")
for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
