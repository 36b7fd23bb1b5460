#!/usr/bin/env python3
"""Checks that vtpmd's modules import only from layers below them.

Layers, top to bottom (backend/src); a module may use any lower layer,
and its own module freely. Same-layer uses are allowed only where listed
in SAME_LAYER. Every `crate::X` path in non-test code counts, whether in a
`use` line or written inline.

  5 process     daemon, config, provision
  4 frontends   frontend
  3 support     transport, exit, logging, fdpass
  2 core        instance
  1 bottom      engine, storage, migration

Run by `make lint` (so by `make test`); exits 1 and names each violation.
"""
import pathlib
import re
import sys

LAYER = {
    "daemon": 5, "config": 5, "provision": 5,
    "frontend": 4,
    "transport": 3, "exit": 3, "logging": 3, "fdpass": 3,
    "instance": 2,
    "engine": 1, "storage": 1, "migration": 1,
}
# (from, to): same-layer uses that are part of the design.
SAME_LAYER = {
    ("daemon", "config"),      # the runners take the validated config
    ("provision", "config"),   # vtpm-setup builds the --key spec vtpmd parses
    ("provision", "daemon"),   # ... and loads it with vtpmd's key loader
    ("transport", "fdpass"),   # unix streams receive descriptors
    ("storage", "engine"),     # the state directory is the engine's NvStore
    ("migration", "engine"),   # a snapshot failure carries the engine's result
}
# Crate roots that must deny unsafe code (allowed only per module).
ROOTS = ["backend/src/lib.rs", "backend/src/setup_main.rs", "common/src/lib.rs", "tools/src/main.rs",
         "tools/src/lib.rs", "bench/src/main.rs", "test-support/src/lib.rs"]
UNSAFE_ALLOWED = {"backend/src/engine/libtpms.rs", "backend/src/fdpass.rs"}

root = pathlib.Path(__file__).resolve().parent.parent
src = root / "backend" / "src"
errors = []


def strip_tests(text):
    """Drops `#[cfg(test)]` items (in-file test modules, test-only code)."""
    out, skip, depth = [], False, 0
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "#[cfg(test)]":
            # Skip the next item: a one-line `mod x;` or a braced block.
            i += 1
            nxt = lines[i] if i < len(lines) else ""
            if nxt.rstrip().endswith(";"):
                i += 1
                continue
            depth = nxt.count("{") - nxt.count("}")
            i += 1
            while i < len(lines) and depth > 0:
                depth += lines[i].count("{") - lines[i].count("}")
                i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def top_module(path):
    rel = path.relative_to(src)
    return rel.parts[0].removesuffix(".rs")


for path in sorted(src.rglob("*.rs")):
    me = top_module(path)
    if me in ("lib", "main"):
        continue
    if path.name == "tests.rs" or path.name == "fake.rs":
        continue  # test-only files (declared under #[cfg(test)])
    text = strip_tests(path.read_text())
    used = set(re.findall(r"\bcrate::(\w+)", text))
    for group in re.findall(r"\buse crate::\{([^}]*)\}", text):
        used |= {part.strip().split("::")[0] for part in group.split(",") if part.strip()}
    for other in sorted(used):
        if other == me or other not in LAYER:
            continue
        if LAYER[other] > LAYER[me]:
            errors.append(f"{path.relative_to(root)}: {me} (layer {LAYER[me]}) uses crate::{other} (layer {LAYER[other]}), which is above it")
        elif LAYER[other] == LAYER[me] and (me, other) not in SAME_LAYER:
            errors.append(f"{path.relative_to(root)}: {me} uses crate::{other} in the same layer; add it to SAME_LAYER in scripts/check-layers.py only if the design wants it")

for r in ROOTS:
    p = root / r
    if "#![deny(unsafe_code)]" not in p.read_text():
        errors.append(f"{r}: crate root lacks #![deny(unsafe_code)]")

for path in sorted(root.glob("*/src/**/*.rs")):
    rel = str(path.relative_to(root))
    if rel in UNSAFE_ALLOWED:
        continue
    if re.search(r"\ballow\(unsafe_code\)", path.read_text()) and rel != "backend/src/lib.rs" and rel != "backend/src/engine/mod.rs":
        errors.append(f"{rel}: allows unsafe code; only {sorted(UNSAFE_ALLOWED)} may")

if errors:
    print("layer check failed:")
    for e in errors:
        print("  " + e)
    sys.exit(1)
print(f"layer check: {len(list(src.rglob('*.rs')))} files, imports point down only")
