"""Reading compiled HLO text in tests."""

import re


def collectives_in_loops(hlo: str) -> list[str]:
    """op names of the `while` instructions whose condition or body (or anything they call)
    holds a collective."""
    comps, cur = {}, None
    for ln in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", ln)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(ln)

    def has(name, seen):
        if name in seen or name not in comps:
            return False
        seen.add(name)
        return any(re.search(r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(-start)?\(", ln)
                   or any(has(c, seen) for c in re.findall(
                       r"(?:condition|body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", ln))
                   for ln in comps[name])

    found = []
    for ln in hlo.splitlines():
        if re.search(r"= .* while\(", ln):
            parts = [re.search(k + r"=%?([\w.\-]+)", ln).group(1) for k in ("condition", "body")]
            if any(has(p, set()) for p in parts):
                op = re.search(r'op_name="([^"]*)"', ln)
                found.append(op.group(1) if op else ln.strip()[:120])
    return found
