"""Fails when include/distcore.h defines or declares a name outside the
dc_ / DC_ / DISTCORE_ prefixes (macros, types, functions, enumerators)."""
import re
import sys

text = open(sys.argv[1]).read()
# Comments say anything; only code declares names.
code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
code = re.sub(r"//[^\n]*", "", code)
names = set(re.findall(r"#define\s+(\w+)", code))
names |= set(re.findall(r"}\s*(\w+)\s*;", code))                # typedef'd structs and enums
names |= set(re.findall(r"typedef\s+[^;{]*?\(\*\s*(\w+)\)", code))  # function pointer types
names |= set(re.findall(r"typedef\s+[\w\s\*]+?\b(\w+)\s*;", code))  # plain typedefs
names |= set(re.findall(r"\b(\w+)\s*\([^;{)]*\)\s*;", code))   # function declarations
for body in re.findall(r"enum\s*\w*\s*{([^}]*)}", code):
    names |= set(re.findall(r"^\s*(\w+)", body, flags=re.M))
allowed = ("dc_", "DC_", "DISTCORE_")
keywords = {"void", "if", "extern", "defined"}
bad = sorted(n for n in names if not n.startswith(allowed) and n not in keywords)
if bad:
    sys.exit(f"{sys.argv[1]}: names outside dc_/DC_/DISTCORE_: {', '.join(bad)}")
print(f"{len(names)} names, all prefixed")
