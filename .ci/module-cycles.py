#!/usr/bin/env python3
"""No import cycles among the top-level modules of a crate's library.

For each crate source directory given (default: broker/src; CI passes
broker/src, client/src and gateway/src), every file is
mapped to its top-level module (`foo.rs` and everything under `foo/` are
`foo`; `lib.rs` and `main.rs` are the roots and are left out), and each
reference `crate::foo` in it (in paths and in `use crate::{foo, ...}`
groups; comments ignored) is an edge to module `foo`. Prints the module
map, then exits 1 if any strongly connected component has more than one
module.
"""

import os
import re
import sys


def modules(src):
    out = {}
    for root, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts[0] in ("lib", "main"):
                continue
            out.setdefault(parts[0], []).append(path)
    return out


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def use_groups(text):
    """The text inside each `crate::{...}` group, nested braces included."""
    for m in re.finditer(r"\bcrate::\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield text[m.end() : i - 1]


def edges(mods):
    names = set(mods)
    graph = {m: set() for m in names}
    for module, paths in mods.items():
        for path in paths:
            with open(path, encoding="utf-8") as f:
                text = strip_comments(f.read())
            used = set(re.findall(r"\bcrate::(\w+)", text))
            for group in use_groups(text):
                # Top-level names of the group: at its start or after a comma
                # at nesting depth 0.
                depth, start = 0, 0
                for i, c in enumerate(group + ","):
                    if c == "{":
                        depth += 1
                    elif c == "}":
                        depth -= 1
                    elif c == "," and depth == 0:
                        m = re.match(r"\s*(\w+)", group[start:i])
                        if m:
                            used.add(m.group(1))
                        start = i + 1
            graph[module] |= (used & names) - {module}
    return graph


def components(graph):
    """Tarjan's strongly connected components."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    failed = False
    for src in sys.argv[1:] or ["broker/src"]:
        mods = modules(src)
        if not mods:
            print(f"{src}: no modules found", file=sys.stderr)
            return 1
        graph = edges(mods)
        print(f"{src}:")
        for m in sorted(graph):
            print(f"  {m:15} -> {', '.join(sorted(graph[m])) or '(nothing)'}")
        cycles = [c for c in components(graph) if len(c) > 1]
        for c in cycles:
            print(f"{src}: modules that use each other: {', '.join(c)}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
