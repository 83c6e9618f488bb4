#!/usr/bin/env python3
"""The workspace's dependency rule, checked on `cargo metadata --no-deps` (read
from standard input):

- no binary crate (a member with a `bin` target, other than the test and
  benchmark crates) has a normal dependency on another binary crate: code
  they share belongs in tether-shell;
- tether-proto depends on no workspace crate;
- tether-pki and tether-config depend on no workspace crate but tether-proto.

Prints each violation and exits 1 if there is one.
"""

import json
import sys

# Test and benchmark crates may link the binaries' libraries.
NOT_PRODUCTS = {"tether-tests", "tether-netns-tests", "tether-bench"}
# The binaries that must exist, so that the check cannot pass vacuously.
EXPECTED_BINARIES = {"tether-broker", "tether-gateway", "tether"}
# Library crates and the workspace crates each may depend on.
LIBRARIES = {
    "tether-proto": set(),
    "tether-pki": {"tether-proto"},
    "tether-config": {"tether-proto"},
}


def main() -> int:
    meta = json.load(sys.stdin)
    members = set(meta["workspace_members"])
    packages = {p["name"]: p for p in meta["packages"] if p["id"] in members}

    def workspace_deps(name):
        return sorted(
            {
                d["name"]
                for d in packages[name]["dependencies"]
                if d["kind"] is None and d["name"] in packages
            }
        )

    binaries = {
        name
        for name, p in packages.items()
        if name not in NOT_PRODUCTS
        and any("bin" in t["kind"] for t in p["targets"])
    }
    problems = []
    for name in sorted(EXPECTED_BINARIES - binaries):
        problems.append(f"{name} is not a workspace member with a bin target")
    for name in sorted(binaries):
        for dep in workspace_deps(name):
            if dep in binaries:
                problems.append(
                    f"{name} depends on the binary crate {dep}: "
                    "move what they share to tether-shell"
                )
    for name, allowed in sorted(LIBRARIES.items()):
        if name not in packages:
            problems.append(f"{name} is not a workspace member")
            continue
        for dep in workspace_deps(name):
            if dep not in allowed:
                may = ", ".join(sorted(allowed)) or "no workspace crate"
                problems.append(f"{name} depends on {dep}; it may depend on {may} only")
    for p in problems:
        print(f"crate dependency rule: {p}", file=sys.stderr)
    if not problems:
        print(f"binary crates: {', '.join(sorted(binaries))}; none depends on another")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
